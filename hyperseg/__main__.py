"""Command line: ``python -m hyperseg list|convert`` (also installed as ``hyperseg``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _list(args: argparse.Namespace) -> int:
    from .zoo import ALIASES, get_config, list_models

    aliases = {target: alias for alias, target in ALIASES.items()}
    print(f"{'name':24s} {'alias':11s} {'dataset':11s} {'classes':>7s} {'input (HxW)':>12s}  arch")
    for name in list_models(include_aliases=False):
        c = get_config(name)
        size = f"{c.input_size[0]}x{c.input_size[1]}"
        print(f"{name:24s} {aliases.get(name, ''):11s} {c.dataset:11s} {c.num_classes:7d} {size:>12s}  {c.arch}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import load, save

    model = load(args.source, backend="torch")
    save(model, args.target)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {args.target}: {model.config.name} ({model.config.arch}), "
          f"{model.num_classes} classes, {params:,} parameters")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperseg", description="HyperSeg semantic segmentation")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the zoo models").set_defaults(run=_list)
    convert = commands.add_parser(
        "convert", help="convert an official .pth checkpoint to our .safetensors format")
    convert.add_argument("source", help="official checkpoint (.pth) or a hyperseg .safetensors file")
    convert.add_argument("target", help="output .safetensors file")
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as err:      # CheckpointError is a ValueError
        print(f"hyperseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
