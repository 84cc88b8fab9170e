"""LFW-format pairs files: read, resolve against a data set, evaluate with 10-fold accuracy, and make new ones."""

from facesiam.commands.make_pairs import main

if __name__ == "__main__":
    main()
