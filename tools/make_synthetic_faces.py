"""Write an ImageFolder of procedurally drawn synthetic faces (see facesiam/data/synthetic.py)."""

from facesiam.data.synthetic import main

if __name__ == "__main__":
    main()
