"""Find wrong labels, duplicates, one person under two names and bad photos in a data set; quarantine and undo."""

from facesiam.commands.doctor import main

if __name__ == "__main__":
    main()
