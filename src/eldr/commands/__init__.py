"""Subcommands of the `eldr` console script; each module has `register(subparsers)`."""
