"""A persistent face gallery: FAISS index + identity table; build, add, search (top-k identities with scores)."""

from facesiam.commands.gallery import main

if __name__ == "__main__":
    main()
