"""`python -m lungscreen` is the `lungscreen` command."""

from lungscreen.cli import main

main()
