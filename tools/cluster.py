"""Sort unlabelled photos into one folder per proposed person, plus unsure/."""

from facesiam.commands.cluster import main

if __name__ == "__main__":
    main()
