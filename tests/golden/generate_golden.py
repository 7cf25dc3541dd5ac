"""Write tests/golden/<model>.json by running the *official* HyperSeg code with formula weights.

Not a test and not run by CI: it needs a local clone of github.com/YuvalNirkin/hyperseg, which
this project never vendors. The numbers it writes are the official implementation's outputs for
the deterministic weights and input of ``tests/golden_weights.py``; ``tests/test_golden.py``
checks that this project's models reproduce them.

    git clone https://github.com/YuvalNirkin/hyperseg /tmp/official
    python tests/golden/generate_golden.py --official /tmp/official

Each official model is built from its training configuration (``configs/train/<name>.py``: the
keyword arguments of its ``model = partial(hyperseg_efficientnet, ...)`` line, read with ``ast``,
``pretrained`` forced off), in float64, eval mode, and run on a plain tensor (the official
``forward(tensor)``: one pass, no flip, no pyramid).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import golden_weights  # noqa: E402  (tests/golden_weights.py)

# zoo name -> official training configuration and the (reduced) input size of the golden run:
# about half the official resolution, a multiple of the model's size divisor.
# The class count is the dataset's, as the official trainer passes it (``num_classes=len(classes)``).
MODELS = {
    "hyperseg-m-cityscapes": ("cityscapes_efficientnet_b1_hyperseg-m", (256, 512), 19),
    "hyperseg-s-cityscapes": ("cityscapes_efficientnet_b1_hyperseg-s", (384, 768), 19),
    "hyperseg-s-camvid": ("camvid_efficientnet_b1_hyperseg-s", (256, 384), 12),
    "hyperseg-l-camvid": ("camvid_efficientnet_b1_hyperseg-l", (384, 512), 12),
    "hyperseg-l-voc": ("vocsbd_efficientnet_b3_hyperseg-l", (256, 256), 21),
}
BATCH = 2
SAMPLES = 256


def _literal(node: ast.AST):
    return ast.literal_eval(node)


def official_model_call(config_path: str):
    """(module of the model function, keyword arguments) of the config's ``model = partial(...)``."""
    tree = ast.parse(open(config_path).read())
    imports = {}
    call = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imports[alias.asname or alias.name] = node.module
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "model"):
            call = node.value
    if call is None or not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "partial"):
        raise SystemExit(f"{config_path}: no 'model = partial(...)' line")
    function = call.args[0].id
    args = [_literal(a) for a in call.args[1:]]
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg == "pretrained":
            continue
        kwargs[keyword.arg] = _literal(keyword.value)
    return imports[function], function, args, kwargs


def build_official(official_root: str, config_name: str, num_classes: int) -> torch.nn.Module:
    module_name, function, args, kwargs = official_model_call(
        os.path.join(official_root, "configs", "train", config_name + ".py"))
    module = importlib.import_module(module_name)
    return getattr(module, function)(*args, pretrained=False, num_classes=num_classes, **kwargs)


def golden_record(official_root: str, name: str) -> dict:
    config_name, (height, width), num_classes = MODELS[name]
    model = build_official(official_root, config_name, num_classes).double().eval()
    state = model.state_dict()
    weights = golden_weights.golden_state_dict(state.items(), torch.float64)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(not golden_weights.is_weight(k) for k in missing), missing
    x = golden_weights.golden_input(BATCH, height, width)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    seconds = time.perf_counter() - start
    positions = golden_weights.sample_positions(tuple(logits.shape), SAMPLES)
    record = golden_weights.summary(logits, positions)
    record.update(model=name, official_config=config_name, input=[BATCH, 3, height, width],
                  dtype="float64", tensors=len(weights), forward_seconds=round(seconds, 2),
                  torch=torch.__version__)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a clone of YuvalNirkin/hyperseg")
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="only these models (default: all five)")
    parser.add_argument("--out", default=HERE, help="folder of the JSON files (default: here)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.official))
    for name in args.model or list(MODELS):
        record = golden_record(args.official, name)
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"{name}: logits {record['shape']}, std {record['std']:.4g}, "
              f"{record['forward_seconds']} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
