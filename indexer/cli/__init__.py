"""The command line: flags and job files -> config dataclasses -> library; errors -> exit codes."""
