"""The ``arena`` click group. Every ``ArenaError`` a command raises is caught here, once, and printed as an error."""

from __future__ import annotations

import click

from arena.errors import ArenaError


class ArenaGroup(click.Group):
    """A click group that turns an ``ArenaError`` (whose message names the file or option and what to do) into
    click's one-line ``Error: ...`` and exit status 1, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ArenaError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=ArenaGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="arena")
def main() -> None:
    """arena: train and run a video deepfake detector (features cache -> head tuning -> fine-tuning -> submission)."""
