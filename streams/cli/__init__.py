"""The ``inferwatch`` command line, one module per command group."""
