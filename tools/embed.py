"""Embed a data set with a trained model: batched, on every process under accelerate, optional flip averaging."""

from facesiam.commands.embed import main

if __name__ == "__main__":
    main()
