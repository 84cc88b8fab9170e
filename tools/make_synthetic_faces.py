"""Write an ImageFolder of procedurally drawn synthetic faces (see facesiam/synthetic.py)."""

from facesiam.commands.make_synthetic_faces import main

if __name__ == "__main__":
    main()
