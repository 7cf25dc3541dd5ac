"""Pretrained weights by name (hyperseg.pretrained), end to end against a local HTTP server on
127.0.0.1 that serves an official-format checkpoint written here: never the real host."""
import dataclasses
import hashlib
import http.server
import os
import socket
import threading

import pytest
import torch

import hyperseg
from hyperseg import zoo
from hyperseg.__main__ import main
from hyperseg.checkpoint import CheckpointError
from hyperseg.pretrained import DownloadError, load_pretrained, weights_path, weights_url
from checkpoint_utils import OFFICIAL_ARCH, randomize_buffers, same_state, write_official

NAME = "hyperseg-s-camvid"
FILE = "camvid_efficientnet_b1_hyperseg-s.pth"


class Server:
    """Serves ``files`` (URL path -> bytes); ``truncate`` paths send their full Content-Length
    but only half the body, then close the connection."""

    def __init__(self):
        self.files, self.truncate, self.requests = {}, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.truncate:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1.0"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def official():
    """A random hyperseg-s-camvid and its official-format checkpoint's bytes."""
    torch.manual_seed(0)
    model = randomize_buffers(hyperseg.build(NAME, backend="torch", channels_last=False))
    return model


@pytest.fixture(scope="module")
def official_bytes(official, tmp_path_factory):
    path = write_official(tmp_path_factory.mktemp("release") / FILE, official, OFFICIAL_ARCH[NAME])
    return path.read_bytes()


@pytest.fixture
def server(official_bytes, monkeypatch, tmp_path):
    s = Server()
    s.files[f"/v1.0/{FILE}"] = official_bytes
    monkeypatch.setenv(zoo.WEIGHTS_URL_ENV, s.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield s
    s.close()


def cache_dir(tmp_path):
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def leftovers(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_pretrained_downloads_into_the_torch_hub_cache_once(server, official, tmp_path):
    model = hyperseg.build(NAME, pretrained=True)
    assert same_state(model, official)
    assert leftovers(cache_dir(tmp_path)) == [FILE]
    assert server.requests == [f"/v1.0/{FILE}"]
    again = hyperseg.build(NAME, pretrained=True)             # from the cache, no request
    assert same_state(again, official) and len(server.requests) == 1


def test_another_folder(server, official, tmp_path):
    folder = tmp_path / "weights"
    model = hyperseg.build(NAME, pretrained=True, weights_dir=folder)
    assert same_state(model, official)
    assert leftovers(folder) == [FILE] and leftovers(cache_dir(tmp_path)) == []


def test_names_urls_and_aliases(monkeypatch, tmp_path):
    monkeypatch.delenv(zoo.WEIGHTS_URL_ENV, raising=False)
    assert weights_url("hyperseg-m") == ("https://github.com/YuvalNirkin/hyperseg/releases/download/"
                                         "v1.0/cityscapes_efficientnet_b1_hyperseg-m.pth")
    assert weights_path("hyperseg-l", tmp_path) == str(tmp_path / "vocsbd_efficientnet_b3_hyperseg-l.pth")
    assert hyperseg.list_models(pretrained=True) == [
        "hyperseg-m-cityscapes", "hyperseg-s-cityscapes", "hyperseg-s-camvid", "hyperseg-l-voc",
        "hyperseg-m", "hyperseg-s", "hyperseg-l"]
    assert "hyperseg-l-camvid" in hyperseg.list_models()


def test_a_model_without_official_weights(server):
    with pytest.raises(ValueError, match=r"hyperseg-l-camvid has no official pretrained.*--weights PATH"):
        hyperseg.build("hyperseg-l-camvid", pretrained=True)
    assert server.requests == []


def test_pretrained_and_weights_or_another_class_count_are_refused(server, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        hyperseg.build(NAME, pretrained=True, weights=tmp_path / "x.pth")
    with pytest.raises(ValueError, match="predict 12 classes, not 5"):
        hyperseg.build(NAME, pretrained=True, num_classes=5)
    assert server.requests == []


def test_offline(server, monkeypatch, tmp_path):
    with socket.socket() as s:                       # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(zoo.WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}/v1.0")
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/v1.0/{FILE} cannot be reached.*"
                                            rf"--weights FILE"):
        hyperseg.build(NAME, pretrained=True)
    assert leftovers(cache_dir(tmp_path)) == []


def test_http_error(server, tmp_path):
    del server.files[f"/v1.0/{FILE}"]
    with pytest.raises(DownloadError, match=r"answered HTTP 404"):
        load_pretrained(NAME, progress=False)
    assert leftovers(cache_dir(tmp_path)) == []


def test_interrupted_transfer_leaves_nothing(server, official_bytes, tmp_path):
    server.truncate.add(f"/v1.0/{FILE}")
    with pytest.raises(DownloadError, match=rf"stopped after [\d,]+ of {len(official_bytes):,} bytes"):
        load_pretrained(NAME, progress=False)
    assert leftovers(cache_dir(tmp_path)) == []


def test_corrupt_download_is_not_kept(server, official_bytes, tmp_path):
    server.files[f"/v1.0/{FILE}"] = official_bytes[:len(official_bytes) // 2]   # whole, but cut
    with pytest.raises(CheckpointError, match=r"downloaded from .* is not a readable checkpoint.*"
                                              r"not kept.*--weights FILE"):
        load_pretrained(NAME, progress=False)
    assert leftovers(cache_dir(tmp_path)) == []


def test_corrupt_cached_file_says_how_to_recover(server, tmp_path):
    folder = cache_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / FILE).write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(CheckpointError, match=r"web page.*delete .* to download it again"):
        load_pretrained(NAME, progress=False)
    assert server.requests == []


def test_sha256_is_verified_when_the_zoo_records_it(server, official, official_bytes, monkeypatch,
                                                    tmp_path):
    right = hashlib.sha256(official_bytes).hexdigest()
    wrong = hashlib.sha256(b"another file").hexdigest()
    entry = zoo.PRETRAINED[NAME]
    monkeypatch.setitem(zoo.PRETRAINED, NAME, dataclasses.replace(entry, sha256=wrong))
    with pytest.raises(CheckpointError, match=rf"SHA-256 {right}, not the official {wrong}"):
        load_pretrained(NAME, progress=False)
    assert leftovers(cache_dir(tmp_path)) == []
    monkeypatch.setitem(zoo.PRETRAINED, NAME, dataclasses.replace(entry, sha256=right))
    assert same_state(hyperseg.build(NAME, pretrained=True), official)
    monkeypatch.setitem(zoo.PRETRAINED, NAME, dataclasses.replace(entry, sha256=wrong))
    with pytest.raises(CheckpointError, match=r"SHA-256 differs .* delete it"):
        load_pretrained(NAME, progress=False)           # the cached file is checked too


def test_unwritable_folder(server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DownloadError, match=r"cannot write the hyperseg-s-camvid weights into"):
        load_pretrained(NAME, folder=blocker / "sub", progress=False)


def test_command_line_pretrained(server, official, tmp_path, capsys):
    image = tmp_path / "a.png"
    torch.manual_seed(1)
    from PIL import Image
    Image.new("RGB", (96, 64), (90, 120, 30)).save(image)
    out = tmp_path / "seg"
    code = main(["predict", str(image), "--model", NAME, "--pretrained", "--out", str(out),
                 "--size", "64x128", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "UNTRAINED" not in captured.err
    assert (out / "a_labels.png").is_file() and leftovers(cache_dir(tmp_path)) == [FILE]


@pytest.mark.parametrize("argv,message", [
    (["predict", "x.png", "--pretrained", "--out", "o"], "--pretrained needs --model NAME"),
    (["predict", "x.png", "--model", NAME, "--pretrained", "--weights", "w.pth", "--out", "o"],
     "either --weights FILE or --pretrained"),
    (["eval", "--model", "hyperseg-l-camvid", "--pretrained", "--data", "synthetic"],
     "hyperseg-l-camvid has no official pretrained weights"),
    (["export", "--model", "hyperseg-l-camvid", "--pretrained", "--onnx", "m.onnx"],
     "hyperseg-l-camvid has no official pretrained weights"),
    (["train", "--model", "hyperseg-l-camvid", "--pretrained", "--data", "synthetic", "--out", "r"],
     "hyperseg-l-camvid has no official pretrained weights"),
])
def test_command_line_checks_pretrained_before_any_work(server, argv, message, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert server.requests == [] and sorted(os.listdir(tmp_path)) == ["torch-home"] * \
        os.path.isdir(tmp_path / "torch-home")


def test_train_starts_from_the_official_weights(server, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", NAME, "--pretrained", "--data",
                 "synthetic:8,size=64", "--num-classes", "12", "--out", str(out), "--steps", "1",
                 "--workers", "0", "--batch-size", "2", "--val-split", "none", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert server.requests == [f"/v1.0/{FILE}"]
    assert '"pretrained": true' in (out / "run.json").read_text()
