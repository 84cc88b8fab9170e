"""Compare two face images: cosine similarity of their embeddings and the same/different decision."""

from facesiam.commands.compare import main

if __name__ == "__main__":
    main()
