"""`python -m fedweights` runs the CLI."""

from .cli import main

main()
