"""facesiam: train and evaluate open-set face recognition (metric learning) models.

Data (facesiam.data) -> training (facesiam.train) -> exported model (facesiam.model) -> embeddings
(facesiam.embed) -> 1:1 and 1:N metrics (facesiam.metrics), galleries (facesiam.gallery), reports (facesiam.evaluate).
"""

__version__ = "0.1.0"
