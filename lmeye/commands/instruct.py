"""`lmeye instruct --config FILE [--set k=v] [--export-hf DIR] [--allow-incomplete]`: build the `instructions` table."""

from __future__ import annotations

import argparse

from lmeye.cli import add_config_args, config_from_args
from lmeye.entry import add_overwrite_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "instruct",
        help="build LMEyeMID-style instruction data (captions, VQA, LLaVA, LMEyeMID) as the instructions table",
    )
    add_config_args(p)
    add_overwrite_arg(p)
    p.add_argument(
        "--export-hf", metavar="DIR", default=None,
        help="also write a Hugging Face DatasetDict (train, validation) to DIR; open it with datasets.load_from_disk",
    )
    p.add_argument(
        "--allow-incomplete", action="store_true",
        help="read the finished shards of an unfinished input table instead of refusing it (said in the summary and manifest)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.entry import run_stage
    from pipelines.instruct import run

    cfg = config_from_args(args)
    if args.export_hf:
        cfg.instruct.export_hf = args.export_hf
    if args.allow_incomplete:
        cfg.instruct.allow_incomplete = True
    return run_stage(run, cfg, overwrite=args.overwrite)  # needs no Ray: the stage runs on this process alone
