"""Subcommands of the ``diffinv`` command line, one module each (``add_parser(subparsers)``)."""
