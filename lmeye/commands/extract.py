"""`lmeye extract [PAIRS] [FEATURES] [--config FILE] [--set k=v]`: CLIP features of a pairs table."""

from __future__ import annotations

import argparse

from lmeye.cli import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="compute CLIP image features of a pairs table into a features table (Ray Data + open_clip)",
        description="Compute CLIP image features of every successful row of a pairs table. "
        "Finished shards are skipped on a rerun; the model, batch and pool sizes come from the extract: "
        "section of the config (e.g. --set extract.model=ViT-L-14 --set extract.pretrained=openai).",
    )
    p.add_argument("pairs", nargs="?", help="pairs table (default: extract.input of the config)")
    p.add_argument("features", nargs="?", help="features table to write (default: extract.output)")
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.entry import run_stage
    from pipelines.extract import run

    cfg = config_from_args(args, **{"extract.input": args.pairs, "extract.output": args.features})
    return run_stage(run, cfg)
