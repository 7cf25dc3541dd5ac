"""Correspondence between our parameter names and the official implementation's.

The official state dict names follow the official module tree (``backbone._blocks.N...``,
``weight_mapper...``, ``decoder.level_N...``); ours follow timm and this package. The map is
derived from the structure of a built model, one rule per kind of module, so that converting in
either direction uses the same table.
"""
from __future__ import annotations

import re
from typing import Dict

import torch.nn as nn

from .decoder import MetaConv

# timm block member -> official MBConv member.
_DS_BLOCK = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce",
             "se.conv_expand": "_se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}
_IR_BLOCK = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
             "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand",
             "conv_pwl": "_project_conv", "bn3": "_bn2"}
_BACKBONE_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}

# Matches "<member>.<tensor>" where member may contain one dot (se.conv_reduce).
_MEMBER = re.compile(r"^(se\.conv_reduce|se\.conv_expand|[^.]+)\.(.+)$")


def _rename_member(rest: str, table: Dict[str, str], key: str) -> str:
    match = _MEMBER.match(rest)
    if not match or match.group(1) not in table:
        raise KeyError(f"no official name for {key!r}")
    return f"{table[match.group(1)]}.{match.group(2)}"


def _backbone_key(model: nn.Module, rest: str, key: str) -> str:
    body = model.backbone.body
    if rest.startswith("body.blocks."):
        _, _, stage, index, member = rest.split(".", 4)
        stage, index = int(stage), int(index)
        flat = sum(len(s) for s in body.blocks[:stage]) + index
        block = body.blocks[stage][index]
        table = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
        return f"backbone._blocks.{flat}.{_rename_member(member, table, key)}"
    if rest.startswith("body."):
        return "backbone." + _rename_member(rest[len("body."):], _BACKBONE_TOP, key)
    match = re.match(r"^reducers\.(\d+)\.(.+)$", rest)
    if match:
        return f"backbone._feat_fc_{match.group(1)}.{match.group(2)}"
    raise KeyError(f"no official name for {key!r}")


def _context_key(arch: str, rest: str, key: str) -> str:
    if arch == "v0_1":
        table = {"down": "down_{}", "fuse": "flat_{}"}
    else:
        table = {"reduce": "in_conv", "down": "down_blocks.{}", "up": "up_blocks.{}"}
    part, _, tail = rest.partition(".")
    if part not in table:
        raise KeyError(f"no official name for {key!r}")
    if "{}" in table[part]:
        index, _, tail = tail.partition(".")
        return f"weight_mapper.{table[part].format(index)}.{tail}"
    return f"weight_mapper.{table[part]}.{tail}"


def _decoder_key(model: nn.Module, arch: str, rest: str, key: str) -> str:
    decoder = model.decoder
    match = re.match(r"^generators\.(\d+)\.weight$", rest)
    if match:
        i = int(match.group(1))
        if arch == "v0_1":
            return f"weight_mapper.out_conv.conv_{i}.weight"
        if arch == "v1_0_unify":
            return f"decoder.weight_blocks.{i}.signal2weights.weight"
        inner = ".0" if isinstance(decoder.blocks[i], MetaConv) else ""
        return f"decoder.level_{i}.0{inner}.signal2weights.weight"
    match = re.match(r"^blocks\.(\d+)\.(bn\d?)\.(.+)$", rest)
    if not match:
        raise KeyError(f"no official name for {key!r}")
    level, bn, tail = int(match.group(1)), match.group(2), match.group(3)
    prefix = f"decoder.level_blocks.{level}.0" if arch == "v1_0_unify" else f"decoder.level_{level}.0"
    if bn == "bn":
        return f"{prefix}.1.{tail}"
    if arch == "v0_1":
        return f"{prefix}.conv.{int(bn[2:]) - 1}.1.{tail}"
    return f"{prefix}.{bn}.{tail}"


def official_names(model: nn.Module) -> Dict[str, str]:
    """For every state-dict key of ``model`` (a ``HyperSeg``), its name in the official model."""
    arch = model.config.arch
    names = {}
    for key in model.state_dict():
        part, _, rest = key.partition(".")
        if part == "backbone":
            names[key] = _backbone_key(model, rest, key)
        elif part == "context_head":
            names[key] = _context_key(arch, rest, key)
        elif part == "decoder":
            names[key] = _decoder_key(model, arch, rest, key)
        else:
            raise KeyError(f"no official name for {key!r}")
    return names
