"""Evaluate a model or an embeddings file: metrics.json, plots and report.md (1:1, 1:N, LFW-style pairs)."""

from facesiam.commands.evaluate import main

if __name__ == "__main__":
    main()
