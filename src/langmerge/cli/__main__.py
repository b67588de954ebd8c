"""`python -m langmerge.cli`: the `langmerge` command."""

from langmerge.cli.main import main

main()
