"""Command-line interface: one click group, each command parses options and calls one library function.

Commands import their modules lazily so that `arena --help` stays fast (torch and timm take seconds to import).
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="arena")
def main() -> None:
    """arena: train and run a video deepfake detector (features cache -> head tuning -> fine-tuning -> submission)."""


# Each stage registers its commands below, in its own section.

# --- section: video (inspect) ---

# --- section: demo (demo-data) ---

# --- section: data (doctor, split) ---

# --- section: cache ---

# --- section: features ---

# --- section: tune (tune-head, frame-test) ---

# --- section: train (train-full) ---

# --- section: submit (submit, evaluate) ---
