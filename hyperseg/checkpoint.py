"""Checkpoints: the official ``.pth`` files (read safely) and our native safetensors format.

Official checkpoints are ``torch.save`` dicts with a ``'state_dict'`` (possibly ``module.``-
prefixed) and an ``'arch'`` string (parsed, never evaluated, by ``hyperseg.official``). The file
is read with ``torch.load(weights_only=True)``, so nothing in it can run code.

Our format is a safetensors file whose metadata holds the model configuration as JSON.

This module reads and writes files and fills a model built elsewhere (``hyperseg.build`` /
``hyperseg.load`` in ``hyperseg.model``); it does not build models.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.nn as nn

from .errors import CheckpointError
from .official import (OFFICIAL_BACKBONES, OFFICIAL_FACTORY, OFFICIAL_MODULES,  # noqa: F401
                       config_from_arch, official_names, parse_arch)
from .zoo import ARCHITECTURE_FIELDS, ModelConfig, architecture_differences  # noqa: F401

if TYPE_CHECKING:  # annotations only: checkpoints fill models without importing the model class
    from .model import HyperSeg

FORMAT = "hyperseg"
FORMAT_VERSION = "1"

_COORD_BUFFER = re.compile(r"^decoder\.coord\d+_\d+$")

# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------

def official_state_dict(model: HyperSeg) -> Dict[str, torch.Tensor]:
    """``model``'s tensors under the official implementation's names."""
    names = official_names(model)
    return {names[key]: value for key, value in model.state_dict().items()}


def _fill(model: HyperSeg, tensors: Dict[str, torch.Tensor], rename: Dict[str, str],
          layout: str) -> None:
    """Load ``tensors`` (named as ``rename`` maps our keys) into ``model``, strictly."""
    expected = set(rename.values())
    missing = [(ours, theirs) for ours, theirs in rename.items() if theirs not in tensors]
    if missing:
        ours, theirs = missing[0]
        alias = f" (ours: {ours!r})" if ours != theirs else ""
        raise CheckpointError(f"{layout} checkpoint is missing {len(missing)} tensor(s), e.g. "
                              f"{theirs!r}{alias}")
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{layout} checkpoint has {len(unexpected)} unexpected tensor(s), "
                              f"e.g. {unexpected[0]!r}")
    own = model.state_dict()
    state = {}
    for ours, theirs in rename.items():
        value = tensors[theirs]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {theirs!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(own[ours].shape):
            raise CheckpointError(f"tensor {theirs!r} has shape {tuple(value.shape)} in the "
                                  f"checkpoint but the model expects {tuple(own[ours].shape)}")
        state[ours] = value
    model.load_state_dict(state, strict=True)


def load_official_state_dict(model: HyperSeg, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load an official-layout state dict into ``model``: ``module.`` prefixes are removed and the
    cached ``decoder.coord{H}_{W}`` buffers dropped; every other tensor must map one to one."""
    tensors = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not _COORD_BUFFER.match(key):
            tensors[key] = value
    _fill(model, tensors, official_names(model), "official")


def _layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("backbone._", "weight_mapper.", "module.")) for k in keys):
        return "official"
    if any(k.startswith(("backbone.body.", "context_head.")) for k in keys):
        return "hyperseg"
    raise CheckpointError("the checkpoint's tensors belong neither to an official HyperSeg model "
                          "nor to a hyperseg one")


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What a checkpoint file holds: tensors, their layout, and the architecture if it says."""
    tensors: Dict[str, torch.Tensor]
    layout: str                        # "official" or "hyperseg"
    config: Optional[ModelConfig]
    extra: Dict[str, Any]
    path: str = ""                     # the file it was read from (named in errors)


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts as a safetensors file does (a header length, then JSON); raises
    CheckpointError when it does but its header runs past the end of the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size, file_size = int.from_bytes(head[:8], "little"), os.path.getsize(path)
    if size + 8 > file_size:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: its header claims "
                              f"{size} bytes but the file has only {file_size} (truncated or "
                              f"corrupt)")
    return size > 0


def _data_digest(path: str) -> str:
    """The SHA-256 of a safetensors file's tensor bytes (everything after the header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _warn_non_finite(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(f"{path!r}: {len(bad)} tensor(s) hold NaN or infinite values, e.g. "
                      f"{bad[0]!r}; the model's outputs will be NaN (a diverged training run?)",
                      RuntimeWarning, stacklevel=3)


def _not_a_torch_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a ``torch.save`` file (a zip archive, or a pickle as the legacy
    format and plain pickles are), from its first bytes; None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text.rstrip("\x00")):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        if first.startswith("version https://git-lfs"):
            return (f"it is a Git LFS pointer (a text file starting with {first!r}), not the "
                    f"checkpoint itself: fetch the file with git lfs pull")
        if first.lower().startswith(("<!doctype html", "<html")):
            return (f"it is a web page (starting with {first!r}), not a checkpoint: download the "
                    f"file again")
        return (f"it is a text file (starting with {first!r}), not a PyTorch (.pth) or "
                f"safetensors checkpoint")
    return (f"it is neither a PyTorch file (a zip archive or a pickle) nor a safetensors file "
            f"(its first bytes are {head[:8]!r})")


def read_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Read an official ``.pth`` or a hyperseg ``.safetensors`` file (nothing is executed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if _is_safetensors(path):
        checkpoint = _read_safetensors(path, map_location)
        _warn_non_finite(path, checkpoint.tensors)
        return checkpoint
    problem = _not_a_torch_file(path)
    if problem:
        raise CheckpointError(f"{path!r} is not a readable checkpoint: {problem}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's restricted unpickler names the global (class or function) it refused to import;
        # anything else it cannot read is corruption, not a threat
        if "global" in str(err).lower():
            raise CheckpointError(
                f"refusing to load {path!r}: it holds objects other than tensors and plain "
                f"containers, and unpickling them could run arbitrary code") from err
        raise CheckpointError(f"{path!r} is not a readable checkpoint (corrupt pickle: {err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError,
            IndexError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated, corrupt or "
                              f"another format): {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj:
        tensors, extra = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        tensors, extra = obj, {}
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointError(f"{path!r} has no state dict")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path!r}: state dict entry {key!r} is not a named tensor")
    arch = extra.get("arch")
    try:
        config = config_from_arch(arch) if arch is not None else None
        layout = _layout(tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{path!r}: {err}") from None
    _warn_non_finite(path, tensors)
    return Checkpoint(dict(tensors), layout, config, extra, path)


def _read_safetensors(path: str, map_location) -> Checkpoint:
    from safetensors import SafetensorError, safe_open
    device = str(map_location) if map_location is not None else "cpu"
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path!r} is not a readable safetensors file (truncated or "
                              f"corrupt): {err}") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path!r} is a safetensors file without a hyperseg model config in "
                              f"its metadata")
    expected = metadata.get("sha256")          # files saved before the checksum have none
    if expected is not None and _data_digest(path) != expected:
        raise CheckpointError(f"{path!r} is corrupt: its tensor data does not match the SHA-256 "
                              f"checksum saved with it (a flipped bit, or a partial copy)")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        layout = _layout(tensors)
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path!r}: invalid model config in the metadata: {err}") from None
    return Checkpoint(tensors, layout, config, {"format_version": metadata.get("format_version")},
                      path)


def load_into(model: HyperSeg, checkpoint: Checkpoint) -> HyperSeg:
    """Fill ``model`` from a checkpoint, after checking that the architectures agree; errors
    name the checkpoint's file."""
    try:
        return _load_into(model, checkpoint)
    except CheckpointError as err:
        if not checkpoint.path:
            raise
        raise CheckpointError(f"{checkpoint.path!r}: {err}") from None


def _load_into(model: HyperSeg, checkpoint: Checkpoint) -> HyperSeg:
    if checkpoint.config is not None:
        diffs = architecture_differences(checkpoint.config, model.config)
        if diffs:
            raise CheckpointError(
                f"the checkpoint is a {checkpoint.config.name} model, which differs from "
                f"{model.config.name} in " + "; ".join(diffs) +
                " (file vs model); use hyperseg.load(path) to build the file's own architecture")
    try:
        if checkpoint.layout == "official":
            load_official_state_dict(model, checkpoint.tensors)
        else:
            own = {key: key for key in model.state_dict()}
            _fill(model, checkpoint.tensors, own, "hyperseg")
    except CheckpointError as err:
        if checkpoint.config is None:
            raise
        source = "'arch' entry" if checkpoint.layout == "official" else "config metadata"
        raise CheckpointError(f"its tensors do not fit the {checkpoint.config.name} model its "
                              f"{source} describes: {err}") from None
    return model


@dataclass
class PartialLoad:
    """What ``load_matching`` did: our tensors it re-initialised (no tensor of that name and
    shape in the checkpoint) and the checkpoint's tensors it did not use (by their names)."""
    reinitialised: List[str]
    unused: List[str]


def load_matching(model: HyperSeg, checkpoint: Checkpoint) -> PartialLoad:
    """Fine-tuning: copy into ``model`` every tensor of ``checkpoint`` whose name (mapped from the
    official names for an official file) and shape match one of the model's, and keep the rest
    as initialised (e.g. the layers that depend on the class count). A checkpoint that shares no
    tensor with the model is refused."""
    if checkpoint.layout == "official":
        tensors = {}
        for key, value in checkpoint.tensors.items():
            key = key[len("module."):] if key.startswith("module.") else key
            if not _COORD_BUFFER.match(key):
                tensors[key] = value
        try:
            rename = official_names(model)
        except KeyError:
            raise CheckpointError(
                f"an official checkpoint can only start a model with the official EfficientNet "
                f"backbone, not {model.config.backbone!r}") from None
    else:
        tensors = checkpoint.tensors
        rename = {key: key for key in model.state_dict()}
    own = model.state_dict()
    state, reinitialised = {}, []
    for ours, theirs in rename.items():
        value = tensors.get(theirs)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(own[ours].shape):
            state[ours] = value
        else:
            reinitialised.append(ours)
    if not state:
        raise CheckpointError("the checkpoint shares no tensor (by name and shape) with "
                              f"{model.config.name}: it cannot start its training")
    model.load_state_dict(state, strict=False)
    used = {rename[key] for key in state}
    return PartialLoad(reinitialised, sorted(set(tensors) - used))


def save(model: HyperSeg, path) -> None:
    """Save ``model`` in our format: safetensors tensors plus its config as JSON metadata.

    The file is written by Python's ``open``, so it gets the permissions of any other file the
    process creates (0644 under the usual umask 022; safetensors' ``save_file`` makes it 0600).
    """
    from safetensors.torch import save as serialize
    if not (isinstance(model, nn.Module) and isinstance(getattr(model, "config", None), ModelConfig)):
        raise TypeError(f"save expects a HyperSeg model, got {type(model).__name__}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "config": json.dumps(model.config.to_dict())}
    # the checksum of the tensor bytes, which do not depend on the metadata
    data = serialize(tensors, metadata=metadata)
    start = 8 + int.from_bytes(data[:8], "little")
    metadata["sha256"] = hashlib.sha256(memoryview(data)[start:]).hexdigest()
    data = serialize(tensors, metadata=metadata)
    with open(os.fspath(path), "wb") as f:
        f.write(data)


def __getattr__(name: str):
    # ``load`` builds a model, so it lives with the model now (``hyperseg.load``)
    if name == "load":
        warnings.warn("hyperseg.checkpoint.load moved to hyperseg.model.load (hyperseg.load)",
                      DeprecationWarning, stacklevel=2)
        from .model import load
        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
