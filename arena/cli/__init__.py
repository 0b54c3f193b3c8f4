"""Command-line interface: one click group; each command parses options and calls one library function.

Commands import library modules inside their functions so that `arena --help` stays fast (torch and timm take
seconds to import); library modules themselves import at the top.
"""

from arena.cli import data, faces, features, submit, train, tune  # noqa: F401 - registers the commands
from arena.cli._main import main

__all__ = ["main"]
