"""facesiam: train and evaluate open-set face recognition (metric learning) models.

Floors, imports only downward: commands/ (argparse, printing, the one error path) -> training/ (the loop and its
components) and eval/ (embedding, metrics, galleries, reports, the evaluate pipeline) -> data/, model, losses,
config -> fileio, errors. See docs/architecture.md.
"""

__version__ = "0.1.0"
