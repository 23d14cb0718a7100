"""The dpe-export command line: app.py (the group, one-line errors), options.py (shared options), commands.py."""
from dpe_export.cli import commands  # noqa: F401  (registers the commands on the group)
from dpe_export.cli.app import main

__all__ = ["main"]
