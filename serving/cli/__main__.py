"""`python -m serving.cli`: the same as the `serving` command."""

from serving.cli import main

main()
