"""`lmeye download INPUT OUTPUT [--config FILE] [--set k=v]`: URL list -> pairs table (img2dataset on Ray)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_stage_command

    add_stage_command(
        sub, "download", help="download a URL list into a pairs table (img2dataset on Ray)",
        positionals=[("input", "download.input", "URL list file or folder (default: download.input)"),
                     ("output", "download.output", "pairs table directory (default: download.output)")],
    )
