"""What is official: the official checkpoints' ``arch`` strings, and the correspondence between our
parameter names and the official implementation's.

An official ``arch`` string is a Python call such as
``hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1', levels=2, ...)``; it is
*parsed* with ``ast`` (its arguments must be literals), never evaluated (``config_from_arch``).

The official state dict names follow the official module tree (``backbone._blocks.N...``,
``weight_mapper...``, ``decoder.level_N...``); ours follow timm and this package. The map is
derived from the structure of a built model, one rule per kind of module, so that converting in
either direction uses the same table.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Dict, List, Tuple

import torch.nn as nn

from .decoder import MetaConv
from .errors import CheckpointError
from .zoo import ModelConfig, architecture_differences, get_config, list_models

OFFICIAL_MODULES = {
    "hyperseg.models.hyperseg_v1_0": "v1_0",
    "hyperseg.models.hyperseg_v1_0_unify": "v1_0_unify",
    "hyperseg.models.hyperseg_v0_1": "v0_1",
}
OFFICIAL_FACTORY = "hyperseg_efficientnet"
OFFICIAL_BACKBONES = {"efficientnet-b1": "tf_efficientnet_b1", "efficientnet-b3": "tf_efficientnet_b3"}
_MAX_ARCH_LENGTH = 10_000

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


# ------------------------------------------------------------------------------------------------
# The official 'arch' string
# ------------------------------------------------------------------------------------------------

def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise CheckpointError("the arch string must call a function by its dotted name")


def _literal(node: ast.AST, what: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise CheckpointError(f"refusing the arch string: {what} is not a literal "
                              f"(only numbers, strings, booleans, None, lists and tuples are "
                              f"allowed; calls, names and attribute access are not)") from err


def parse_arch(arch: str) -> Tuple[str, List[Any], Dict[str, Any]]:
    """Split an official arch string into (function name, positional args, keyword args).

    Only a single call of a dotted function name with literal arguments is accepted; the string is
    parsed with ``ast`` and nothing in it is executed.
    """
    if not isinstance(arch, str):
        raise CheckpointError(f"the arch entry must be a string, got {type(arch).__name__}")
    if len(arch) > _MAX_ARCH_LENGTH:
        raise CheckpointError(f"the arch string is implausibly long ({len(arch)} characters)")
    try:
        tree = ast.parse(arch.strip(), mode="eval")
    except SyntaxError as err:
        raise CheckpointError(f"the arch string is not a Python call: {err.msg}") from err
    call = tree.body
    if not isinstance(call, ast.Call):
        raise CheckpointError("the arch string must be a single function call")
    func = _dotted_name(call.func)
    args = []
    for i, node in enumerate(call.args):
        if isinstance(node, ast.Starred):
            raise CheckpointError("the arch string may not unpack arguments (*args)")
        args.append(_literal(node, f"positional argument {i}"))
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise CheckpointError("the arch string may not unpack arguments (**kwargs)")
        kwargs[keyword.arg] = _literal(keyword.value, f"argument {keyword.arg!r}")
    return func, args, kwargs


def _as_tuple(value, length: int, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise CheckpointError(f"{what} has {len(value)} entries, expected {length}")
        return tuple(value)
    return (value,) * length


def config_from_arch(arch: str) -> ModelConfig:
    """The ``ModelConfig`` described by an official arch string: the matching zoo entry when the
    architecture is one of the five (with another class count if the file has one), else a custom
    configuration named ``custom-<arch>``."""
    func, args, kw = parse_arch(arch)
    version = _official_version(func)
    values = _common_values(version, _backbone_argument(args, kw), kw)
    values.update(_v01_values(kw) if version == "v0_1" else _v1_values(version, kw))
    values["expand_ratio"] = _expand_ratio(kw)
    if kw:
        raise CheckpointError(f"unsupported arguments in the arch string: {sorted(kw)}")
    return _zoo_or_custom(version, values)


def _official_version(func: str) -> str:
    module, _, name = func.rpartition(".")
    if module not in OFFICIAL_MODULES or name != OFFICIAL_FACTORY:
        raise CheckpointError(f"unsupported architecture {func!r}; expected "
                              f"{' / '.join(m + '.' + OFFICIAL_FACTORY for m in OFFICIAL_MODULES)}")
    return OFFICIAL_MODULES[module]


def _backbone_argument(args: List[Any], kw: Dict[str, Any]) -> str:
    if len(args) > 1:
        raise CheckpointError(f"unexpected positional arguments in the arch string: {args[1:]}")
    model_name = args[0] if args else kw.pop("model_name", None)
    if model_name not in OFFICIAL_BACKBONES:
        raise CheckpointError(f"unsupported backbone {model_name!r}; expected one of "
                              f"{sorted(OFFICIAL_BACKBONES)}")
    return model_name


def _common_values(version: str, model_name: str, kw: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments every version shares (consumed from ``kw``); refuses what we do not build."""
    for ignored in ("pretrained", "weights_path"):
        kw.pop(ignored, None)
    if kw.pop("with_out_fc", False):
        raise CheckpointError("with_out_fc=True (a final patch-wise conv) is not supported")
    kw.pop("decoder_dropout", None)          # only used by the unsupported final conv
    if kw.pop("in_nc", 3) != 3:
        raise CheckpointError("only 3-channel (RGB) inputs are supported")
    layers = kw.pop("level_layers", 1)
    if set(layers if isinstance(layers, (list, tuple)) else [layers]) != {1}:
        raise CheckpointError("only one block per decoder level (level_layers=1) is supported")
    num_classes = kw.pop("num_classes", 3)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CheckpointError(f"invalid num_classes {num_classes!r} in the arch string")
    return dict(arch=version, backbone=OFFICIAL_BACKBONES[model_name],
                num_classes=num_classes, context_levels=kw.pop("levels", 3),
                tta_hflip=bool(kw.pop("inference_hflip", False)),
                tta_gather=kw.pop("inference_gather", "mean"))


def _v01_values(kw: Dict[str, Any]) -> Dict[str, Any]:
    values = dict(kernel_sizes=_as_tuple(kw.pop("kernel_sizes", 3), 6, "kernel_sizes"),
                  weight_groups=kw.pop("weight_groups", 1),
                  context_global_pool=bool(kw.pop("avg_pool", True)))
    for one in ("down_groups", "flat_groups"):
        if kw.pop(one, 1) != 1:
            raise CheckpointError(f"{one} other than 1 is not supported")
    kw.pop("groups", None)                # accepted and unused by the official v0_1 model
    return values


def _v1_values(version: str, kw: Dict[str, Any]) -> Dict[str, Any]:
    if "level_channels" not in kw:
        raise CheckpointError("the arch string has no level_channels")
    values: Dict[str, Any] = dict(level_channels=tuple(kw.pop("level_channels")))
    levels = len(values["level_channels"])
    values["kernel_sizes"] = _as_tuple(kw.pop("kernel_sizes", 3), levels, "kernel_sizes")
    values["out_feat_scale"] = tuple(float(s) for s in _as_tuple(kw.pop("out_feat_scale", 0.25), 5,
                                                                 "out_feat_scale"))
    groups = kw.pop("weight_groups", 1)
    values["weight_groups"] = tuple(groups) if isinstance(groups, (list, tuple)) else groups
    values["decoder_groups"] = kw.pop("decoder_groups", 1)
    kw.pop("groups", None)                # accepted and unused by the official v1 models
    if version == "v1_0_unify":
        values["unify_level"] = kw.pop("unify_level", None)
    values["coords_res"] = tuple(tuple(r) for r in kw.pop("coords_res", None) or ())
    return values


def _expand_ratio(kw: Dict[str, Any]):
    expand = kw.pop("expand_ratio", 1)
    if isinstance(expand, (list, tuple)):
        if len(set(expand)) != 1:
            raise CheckpointError("per-level expand ratios are not supported")
        expand = expand[0]
    return expand


def _zoo_or_custom(version: str, values: Dict[str, Any]) -> ModelConfig:
    """The zoo model with these architecture values (any class count), else a custom config."""
    for zoo_name in list_models(include_aliases=False):
        zoo = get_config(zoo_name)
        candidate = dataclasses.replace(zoo, **values)
        if not architecture_differences(candidate, zoo, ignore=("num_classes",)):
            return dataclasses.replace(get_config(zoo_name, values["num_classes"]),
                                       tta_hflip=values["tta_hflip"], tta_gather=values["tta_gather"])
    try:
        config = ModelConfig(name=f"custom-{version}", dataset="custom", input_size=(512, 512),
                             **values)
        config.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the arch string does not describe a valid model: {err}") from err
    return config
