"""Serve a trained model: python tools/serve.py --checkpoint RUN/best --gallery GALLERY --report REPORT (see --help)."""

from facesiam.commands.serve import main

if __name__ == "__main__":
    main()
