"""Command line: ``python -m hyperseg list`` (also installed as ``hyperseg``)."""
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperseg", description="HyperSeg semantic segmentation")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the zoo models").set_defaults(run=_list)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
