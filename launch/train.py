"""Train a facesiam model: `accelerate launch [--config_file accelerate_configs/X.yaml] launch/train.py --data SHARDS --output RUN`.

Thin entry point; the loop lives in facesiam/training/loop.py. `python launch/train.py ...` runs the same in one process.
"""

from facesiam.commands.train import main

if __name__ == "__main__":
    main()
