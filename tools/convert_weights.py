"""Convert third-party ImageNet weights for --pretrained: python tools/convert_weights.py efficientnet-lite0 OUT.safetensors (see --help)."""

from facesiam.commands.convert_weights import main

if __name__ == "__main__":
    main()
