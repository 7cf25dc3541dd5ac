"""Deterministic weights and inputs for the golden-output tests, from a formula, not an RNG.

Every value is a function of a tensor's *official* name (the name it has in the official
implementation's state dict) and of the element's flat index, computed with integer arithmetic
only (splitmix64 on ``crc32(name)`` and the index), so the official code and this project can
build bit-identical weights without sharing a random number generator, a file or a torch version.

The scales keep a random network well conditioned, so that float32 and float64 agree to about
1e-6 of the logits' spread: convolution and linear weights are uniform with the variance of
LeCun's initialisation times ``GAIN`` (fan-in = elements per output channel); BatchNorm's
``running_var`` lies in [1, 1.5] (never a tiny variance that would amplify rounding noise), its
``weight`` in [0.75, 1.25]; biases and ``running_mean`` in [-0.1, 0.1]. The ``decoder.coord*``
buffers of the official decoder are left alone (they are image coordinates, not weights).

``tests/golden/generate_golden.py`` runs the official code with these weights;
``tests/test_golden.py`` runs ours and compares.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Dict, Iterable, Tuple

import numpy as np
import torch

GAIN = 1.5
_COORD_BUFFER = re.compile(r"^(module\.)?decoder\.coord\d+_\d+$")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK64


def uniform(name: str, count: int) -> np.ndarray:
    """``count`` float64 values in [0, 1), a pure function of ``name`` and the index."""
    seed = np.uint64(zlib.crc32(name.encode("utf-8")))
    with np.errstate(over="ignore"):
        index = np.arange(count, dtype=np.uint64) + (seed << np.uint64(32))
    bits = _splitmix64(index) >> np.uint64(11)          # 53 random bits
    return bits.astype(np.float64) * (1.0 / 2.0 ** 53)


def _signed(name: str, count: int) -> np.ndarray:
    return 2.0 * uniform(name, count) - 1.0


def value(name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The float64 value of the floating-point tensor called ``name`` (official name)."""
    shape = tuple(shape)
    count = int(np.prod(shape)) if shape else 1
    if name.endswith("running_var"):
        flat = 1.0 + 0.5 * uniform(name, count)
    elif name.endswith("running_mean") or name.endswith("bias"):
        flat = 0.1 * _signed(name, count)
    elif len(shape) <= 1:                                  # BatchNorm / norm scale
        flat = 1.0 + 0.25 * _signed(name, count)
    else:
        fan_in = count // shape[0]
        flat = _signed(name, count) * (GAIN * math.sqrt(3.0 / fan_in))
    return flat.reshape(shape)


def is_weight(name: str) -> bool:
    """Whether the state-dict entry ``name`` gets a formula value (not the coordinate caches)."""
    return not _COORD_BUFFER.match(name)


def golden_state_dict(shapes: Iterable[Tuple[str, torch.Tensor]],
                      dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Formula values for ``(official name, tensor)`` pairs: floating tensors get ``value``,
    integer ones (``num_batches_tracked``) zero, coordinate caches are omitted."""
    out = {}
    for name, tensor in shapes:
        if not is_weight(name):
            continue
        if tensor.is_floating_point():
            out[name] = torch.from_numpy(value(name, tuple(tensor.shape))).to(dtype)
        else:
            out[name] = torch.zeros_like(tensor)
    return out


def golden_input(batch: int, height: int, width: int) -> torch.Tensor:
    """A float64 (batch, 3, height, width) image batch: smooth colour ramps plus texture, in the
    range of a normalised photograph (about [-2, 2])."""
    ys = np.linspace(-1.0, 1.0, height)[:, None]
    xs = np.linspace(-1.0, 1.0, width)[None, :]
    planes = []
    for b in range(batch):
        for c in range(3):
            ramp = np.sin(3.0 * (c + 1) * xs + (b + 1) * ys) + np.cos(2.0 * (b + 2) * ys * xs)
            noise = _signed(f"input.{b}.{c}", height * width).reshape(height, width)
            planes.append(0.8 * ramp + 0.6 * noise)
    return torch.from_numpy(np.stack(planes).reshape(batch, 3, height, width))


def sample_positions(shape: Tuple[int, int, int, int], count: int) -> np.ndarray:
    """``count`` fixed (b, c, y, x) positions in a logits tensor of ``shape``, as an int array."""
    coords = [np.minimum((uniform(f"sample.{axis}", count) * n).astype(np.int64), n - 1)
              for axis, n in enumerate(shape)]
    return np.stack(coords, axis=1)


def summary(logits: torch.Tensor, positions: np.ndarray) -> dict:
    """What a golden file holds about ``logits``: sampled values and summary statistics."""
    t = logits.detach().to(torch.float64).cpu()
    idx = torch.from_numpy(positions)
    sampled = t[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]]
    return {
        "shape": list(t.shape),
        "positions": positions.tolist(),
        "values": sampled.tolist(),
        "class_mean": t.mean(dim=(0, 2, 3)).tolist(),
        "class_std": t.std(dim=(0, 2, 3)).tolist(),
        "mean": t.mean().item(),
        "std": t.std().item(),
        "min": t.min().item(),
        "max": t.max().item(),
    }
