"""Subcommands of ``mer``; see ``cli.py`` for the contract each module follows."""
