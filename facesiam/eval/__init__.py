"""Evaluation: the embedding loop (embed), metrics, pairs files, the FAISS gallery, plots, reports, and the
``evaluate`` pipeline that training validation, the evaluate command and the demo share."""
