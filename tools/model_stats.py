"""Parameters, GMACs and GFLOPs of embedding networks: python tools/model_stats.py [BACKBONE ...] (see --help)."""

from facesiam.commands.model_stats import main

if __name__ == "__main__":
    main()
