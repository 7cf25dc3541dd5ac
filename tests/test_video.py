"""Segmenting videos: ``hyperseg.predict_video`` and ``hyperseg predict clip.mp4``, on short videos
written here with PyAV (a few frames of 64 x 128 or smaller, segmented at 64 x 64)."""
import io
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import hyperseg
import hyperseg.video as video
from hyperseg.__main__ import main
from hyperseg.video import VideoError, label_pixel_format, predict_video
from parity_utils import calibrate_conditioned
from video_utils import (noise_frames, packet_offsets, read_video, two_colour_frames,
                         write_video)

av = pytest.importorskip("av")

NAME = "hyperseg-s-camvid"
SIZE = (64, 64)                    # the network input size of every test


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = hyperseg.build(NAME, backend="torch")
    return calibrate_conditioned(m, torch.rand(2, 3, *SIZE) * 4 - 2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Five two-colour frames of 64 x 128 at 12.5 frames per second (H.264 in MP4)."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", two_colour_frames(5, 64, 128))


def test_a_video_is_segmented_into_colour_overlay_and_label_videos(model, clip, tmp_path):
    bar_text = io.StringIO()
    from tqdm import tqdm
    with tqdm(unit="frame", file=bar_text) as bar:
        result = predict_video(model, clip, tmp_path / "seg", size=SIZE, batch_size=2,
                               progress=bar)
    assert result.error is None and result.frames == 5 and result.fps > 0
    assert "5/5" in bar_text.getvalue() and "frame" in bar_text.getvalue()
    color_path, overlay_path, labels_path = result.paths
    assert [p.rsplit("/", 1)[1] for p in result.paths] == [
        "clip_color.mp4", "clip_overlay.mp4", "clip_labels.mkv"]

    frames, rate, size, _ = read_video(clip)
    expected = [hyperseg.predict(model, frame, size=SIZE).numpy() for frame in frames]
    labels, labels_rate, labels_size, codec = read_video(labels_path, "gray")
    assert codec == "ffv1" and labels_size == size == (64, 128) and labels_rate == rate
    assert len(labels) == 5
    for got, want in zip(labels, expected):           # lossless: the model's own class maps
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(expected[0])) > 1            # a map worth comparing

    colors = hyperseg.palette(model.config)
    for path, reference in ((color_path, [colors[e] for e in expected]),
                            (overlay_path, [np.rint(0.5 * f + 0.5 * colors[e])
                                            for f, e in zip(frames, expected)])):
        decoded, out_rate, out_size, codec = read_video(path)
        assert codec == "h264" and out_size == size and out_rate == rate == Fraction(25, 2)
        assert len(decoded) == 5
        for got, want in zip(decoded, reference):     # within the codec's loss
            assert np.abs(got.astype(np.float64) - want).mean() < 4


def test_frames_in_flight_stay_bounded_however_long_the_video(model, tmp_path):
    long_clip = write_video(tmp_path / "long.mp4", two_colour_frames(24, 64, 64))
    result = predict_video(model, long_clip, tmp_path / "seg", size=SIZE, batch_size=2,
                           max_in_flight=4)
    assert result.error is None and result.frames == 24
    # a batch holds 2 frames at once; the decoder, faster than the model, is held at the bound
    assert 2 <= result.peak_in_flight <= 4 < result.frames
    with pytest.raises(ValueError, match="max_in_flight"):
        predict_video(model, long_clip, tmp_path / "x", batch_size=8, max_in_flight=4)


def test_odd_frame_sizes_keep_their_size(model, tmp_path):
    odd = write_video(tmp_path / "odd.mkv", two_colour_frames(2, 45, 67), pix_fmt="yuv444p")
    result = predict_video(model, odd, tmp_path / "seg", size=SIZE)
    assert result.error is None and result.frames == 2
    for path in result.paths:
        frames, _, size, _ = read_video(path)
        assert size == (45, 67) and len(frames) == 2


@pytest.fixture(scope="module")
def noisy_clip(tmp_path_factory):
    """Ten random frames, the index at the front of the MP4 so that a cut file still opens."""
    return write_video(tmp_path_factory.mktemp("noisy") / "noisy.mp4", noise_frames(10, 64, 64),
                       options={"movflags": "faststart"})


@pytest.mark.parametrize("cut", ["inside a frame", "between frames"])
def test_a_truncated_video_keeps_the_frames_before_the_cut(noisy_clip, tmp_path, capsys, cut):
    data = noisy_clip.read_bytes()
    offsets = packet_offsets(noisy_clip)
    end = offsets[6] + (100 if cut == "inside a frame" else 0)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(data[:end])
    out = tmp_path / "seg"
    code = main(["predict", str(truncated), "--model", NAME, "--out", str(out), "--size", "64x64",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    # the six whole frames before the cut are decoded (those the decoder holds included)
    reason = ("decoding failed after 6 frame(s): Invalid data found when processing input (a "
              "corrupt or truncated video?)" if cut == "inside a frame" else
              "the video ended after 6 of the 10 frames its header announces (truncated?)")
    assert f"cut.mp4: {reason}; the 6 frame(s) segmented before it are in " in err
    for name in ("cut_color.mp4", "cut_overlay.mp4", "cut_labels.mkv"):
        frames, _, size, _ = read_video(out / name)         # complete, playable files
        assert len(frames) == 6 and size == (64, 64)


def test_unreadable_videos_are_clear_errors(model, tmp_path, capsys):
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n")
    with pytest.raises(VideoError, match="cannot open the video"):
        predict_video(model, fake, tmp_path / "seg")
    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoError, match="holds no video stream"):
        predict_video(model, audio, tmp_path / "seg")
    out = tmp_path / "out"
    assert main(["predict", str(fake), str(tmp_path / "missing.mkv"), "--model", NAME,
                 "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "notes.mp4: cannot open the video" in err and "missing.mkv: no such file" in err
    assert "no image or video was segmented to its end" in err and not out.exists()


def test_failures_part_way_are_reported_and_stop_the_run(model, clip, tmp_path, monkeypatch):
    tiny = write_video(tmp_path / "tiny.mp4", two_colour_frames(2, 16, 16))
    result = predict_video(model, tiny, tmp_path / "seg", size="native")
    assert "native size needs at least 32 x 32" in result.error
    assert result.frames == 0 and result.paths == [] and not (tmp_path / "seg").exists()

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = predict_video(model, clip, blocker / "seg", size=SIZE)
    assert result.error.startswith("cannot write the segmented video into")
    assert result.frames == 0

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")
    monkeypatch.setattr(video, "label_batch", broken)
    result = predict_video(model, clip, tmp_path / "seg", size=SIZE)
    assert result.error == "segmentation failed: out of memory (injected)"
    assert result.frames == 0


def test_without_an_h264_encoder_the_error_says_so(model, clip, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "VIDEO_CODEC", "no-such-codec")
    result = predict_video(model, clip, tmp_path / "seg", size=SIZE)
    assert "this PyAV build cannot encode H.264" in result.error and result.frames == 0


def test_class_ids_above_255_are_written_as_16_bit(tmp_path):
    assert label_pixel_format(256) == "gray" and label_pixel_format(257) == "gray16le"
    labels = (np.arange(64 * 64).reshape(64, 64) % 300).astype(np.uint16)
    writers = video.open_writers(av, str(tmp_path), "many", Fraction(10), 64, 64, 300)
    for writer, frame in zip(writers, (np.zeros((64, 64, 3), np.uint8),) * 2 + (labels,)):
        writer.write(frame)
    for writer in writers:
        writer.close()
    (decoded,), _, _, _ = read_video(tmp_path / "many_labels.mkv", "gray16le")
    np.testing.assert_array_equal(decoded, labels)


def test_the_predict_command_takes_videos_and_images_together(clip, tmp_path, capsys):
    image = tmp_path / "street.png"
    Image.fromarray(two_colour_frames(1, 64, 96)[0]).save(image)
    out = tmp_path / "seg"
    code = main(["predict", str(clip), str(image), "--model", NAME, "--out", str(out),
                 "--size", "64x64", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "clip.mp4: 5 frames in" in captured.out and "frames/s" in captured.out
    assert "segmented 2 of 2 input(s)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [
        "clip_color.mp4", "clip_labels.mkv", "clip_overlay.mp4",
        "street_color.png", "street_labels.png", "street_overlay.png"]


def _no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("hyperseg.commands._load_model", fail)


def test_without_pyav_a_video_asks_for_the_video_extra(model, clip, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)           # `import av` raises ImportError
    with pytest.raises(VideoError, match=r'pip install "hyperseg\[video\]"'):
        predict_video(model, clip, tmp_path / "seg")
    _no_model(monkeypatch)
    out = tmp_path / "seg"
    assert main(["predict", str(clip), "--model", NAME, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert 'clip.mp4: reading and writing videos needs PyAV (the av package): pip install ' \
           '"hyperseg[video]"' in err
    assert not out.exists()


def test_importing_hyperseg_does_not_need_pyav():
    code = ("import sys; sys.modules['av'] = None; import hyperseg, hyperseg.video, "
            "hyperseg.__main__; hyperseg.predict_video; print('imported')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr
