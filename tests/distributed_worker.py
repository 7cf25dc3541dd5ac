"""Run by tests/test_distributed.py under torchrun: train a run given as JSON, then write this
rank's parameters and buffers to <out>/rank<RANK>.safetensors for comparison."""
import json
import os
import sys

import torch
from safetensors.torch import save_file

from hyperseg.train import RunOptions, make_config, train


def main() -> None:
    out, model, data, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    torch.set_num_threads(1)
    config = make_config(model, data, overrides)
    trained = train(config, out, options=RunOptions(workers=0, quiet=True))
    tensors = {name: value.detach().clone().contiguous()
               for name, value in trained.state_dict().items()}
    save_file(tensors, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    main()
