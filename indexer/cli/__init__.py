"""The command line: flags and job files -> config dataclasses -> the library; errors -> exit codes."""
