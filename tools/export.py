"""Export a trained model to ONNX: python tools/export.py RUN/best --onnx model.onnx (see --help)."""

from facesiam.commands.export import main

if __name__ == "__main__":
    main()
