"""`python -m indexer`: the console script, for environments without it on PATH."""

from indexer.cli.main import entry

if __name__ == "__main__":
    entry()
