"""Detect and align faces: python tools/align_faces.py SRC DST [--workers N] [--device cuda] (see --help)."""

from facesiam.commands.align_faces import main

if __name__ == "__main__":
    main()
