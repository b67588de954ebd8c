"""The command line: parsing, calling the workflows, mapping errors to exit codes."""

from langmerge.cli.main import main

__all__ = ["main"]
