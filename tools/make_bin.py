"""Write an insightface .bin verification set from a folder of aligned 112x112 crops and an LFW-format pairs file."""

from facesiam.commands.make_bin import main

if __name__ == "__main__":
    main()
