"""Pack an ImageFolder into WebDataset shards: python tools/make_shards.py SRC DST [--val-identities N] (see --help)."""

from facesiam.commands.make_shards import main

if __name__ == "__main__":
    main()
