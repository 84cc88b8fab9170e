"""Training: the loop (loop.py) and its components -- setup, cadence, checkpoint, validation, tracking.

Only this package and eval/embed know Accelerate.
"""

from .loop import Trainer, TrainingDiverged, train

__all__ = ["Trainer", "TrainingDiverged", "train"]
