"""``python -m streams.cli``: the command line, its modules imported once."""

from streams.cli.main import main

main()
