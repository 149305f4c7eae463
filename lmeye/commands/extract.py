"""`lmeye extract [PAIRS] [FEATURES] [--config FILE] [--set k=v]`: CLIP features of a pairs table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_stage_command

    add_stage_command(
        sub, "extract",
        help="compute CLIP image features of a pairs table into a features table (Ray Data + open_clip)",
        description="Compute CLIP image features of every successful row of a pairs table. "
        "Finished shards are skipped on a rerun; the model, batch and pool sizes come from the extract: "
        "section of the config (e.g. --set extract.model=ViT-B-32-quickgelu --set extract.pretrained=openai).",
        positionals=[("pairs", "extract.input", "pairs table (default: extract.input of the config)"),
                     ("features", "extract.output", "features table to write (default: extract.output)")],
    )
