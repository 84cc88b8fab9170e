"""Run by tests/training/test_precision.py under `accelerate launch`: train as the flags say and write, as JSON to the
file named first, the dtypes the embedding network's trunk produced in training steps and the precision that ran."""

import json
import sys

from facesiam.commands.train import config_from_args, parser
from facesiam.training.loop import Trainer

out, argv = sys.argv[1], sys.argv[2:]
trainer = Trainer(config_from_args(parser().parse_args(argv)))
seen: set[str] = set()
trainer.network.trunk.register_forward_hook(lambda module, inputs, output: seen.add(str(output.dtype)))
trainer.train()
if trainer.main:
    with open(out, "w") as f:
        json.dump({"dtypes": sorted(seen), "precision": trainer.accelerator.mixed_precision,
                   "recorded": trainer.cfg.mixed_precision}, f)
