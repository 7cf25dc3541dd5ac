"""Official pretrained weights by name: download once into the torch hub cache, read safely.

``load_pretrained(name)`` returns the ``Checkpoint`` of the model's official release file. The
file lives in ``<torch.hub.get_dir()>/checkpoints/<official file name>`` (where
``torch.hub.load_state_dict_from_url`` keeps its files, so ``TORCH_HOME`` moves it), or in the
folder given. A file already there is used without the network. A download goes to a temporary
file in the same folder, is checked (its length, its SHA-256 when the zoo records one, and that
it reads as a checkpoint) and only then renamed into place, so an interrupted or corrupt
download leaves nothing that looks finished. Files are read with ``read_checkpoint``
(``torch.load(weights_only=True)``: nothing in them runs).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Optional

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .zoo import WEIGHTS_BASE_URL, WEIGHTS_URL_ENV, get_config, pretrained_weights

CHUNK = 1 << 20
TIMEOUT_S = 30


class DownloadError(OSError):
    """The weights could not be downloaded (offline, server error, interrupted transfer)."""


def weights_url(name: str) -> str:
    """The URL of the official checkpoint of ``name`` (``HYPERSEG_WEIGHTS_URL`` replaces the
    release's base URL)."""
    base = os.environ.get(WEIGHTS_URL_ENV) or WEIGHTS_BASE_URL
    return f"{base.rstrip('/')}/{pretrained_weights(name).file}"


def weights_dir() -> str:
    """The default folder of downloaded weights: ``<torch.hub.get_dir()>/checkpoints``."""
    import torch.hub
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def weights_path(name: str, folder=None) -> str:
    """Where the official checkpoint of ``name`` is kept (in ``folder``, default
    ``weights_dir()``)."""
    folder = weights_dir() if folder is None else os.fspath(folder)
    return os.path.join(folder, pretrained_weights(name).file)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_get(name: str, url: str, path: str, start: str = "download") -> str:
    return (f"{start} {url} yourself and pass it with --weights FILE (Python: "
            f"hyperseg.build({name!r}, weights=FILE)), or put it at {path}")


def load_pretrained(name: str, folder=None, progress: bool = True) -> Checkpoint:
    """The official checkpoint of the zoo model ``name`` (or an alias), downloaded if needed.

    Raises ValueError for a model without official weights, ``DownloadError`` when the file is
    not there and cannot be downloaded, ``CheckpointError`` for a file that is not the checkpoint
    (corrupt, or another SHA-256 than the zoo records). Each message names the URL and how to
    pass a local file instead.
    """
    config = get_config(name)
    expected = pretrained_weights(name).sha256
    path = weights_path(name, folder)
    url = weights_url(name)
    if os.path.isfile(path):
        if expected is not None and sha256_of(path) != expected:
            raise CheckpointError(f"{path!r} is not the official {config.name} checkpoint (its "
                                  f"SHA-256 differs from the zoo's {expected}); delete it to "
                                  f"download it again from {url}")
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete {path!r} to download it again from {url}") from None
    return _download_checkpoint(config.name, url, path, expected, progress)


def _download_checkpoint(name: str, url: str, path: str, expected: Optional[str],
                         progress: bool) -> Checkpoint:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial",
                                           dir=folder)
    except OSError as err:
        raise DownloadError(f"cannot write the {name} weights into {folder!r}: "
                            f"{err.strerror or err}; pass another folder (--weights-dir DIR) or "
                            f"{_how_to_get(name, url, path)}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            digest = _fetch(url, out, progress)
        if expected is not None and digest != expected:
            raise CheckpointError(f"the file downloaded from {url} has SHA-256 {digest}, not the "
                                  f"official {expected}: it was not kept")
        try:
            checkpoint = read_checkpoint(partial)
        except CheckpointError as err:
            raise CheckpointError(f"the file downloaded from {url} is not a readable checkpoint "
                                  f"({err}); it was not kept. "
                                  f"{_how_to_get(name, url, path, 'Download')}") from None
        os.replace(partial, path)
        return checkpoint
    except DownloadError as err:
        raise DownloadError(f"cannot download the {name} weights: {err}. "
                            f"{_how_to_get(name, url, path, 'Download')}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _fetch(url: str, out, progress: bool) -> str:
    """Copy ``url`` into the open file ``out`` with a progress bar; the SHA-256 of the bytes.
    DownloadError when the server cannot be reached, answers with an error, or sends fewer bytes
    than its Content-Length."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      desc=os.path.basename(url), disable=not progress) as bar:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"{url} cannot be reached ({err.reason}; offline?)") from None
    except (OSError, ValueError, http.client.HTTPException) as err:   # timeouts, IncompleteRead
        raise DownloadError(f"the transfer from {url} failed after {received:,} bytes "
                            f"({type(err).__name__}: {err})") from None
    if total is not None and received != total:
        raise DownloadError(f"the transfer from {url} stopped after {received:,} of {total:,} "
                            f"bytes")
    return digest.hexdigest()
