"""`lmeye download INPUT OUTPUT [--config FILE]`: URL list -> pairs table (img2dataset on Ray)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_config_args

    p = sub.add_parser("download", help="download a URL list into a pairs table (img2dataset on Ray)")
    p.add_argument("input", nargs="?", help="URL list file or folder (default: download.input)")
    p.add_argument("output", nargs="?", help="pairs table directory (default: download.output)")
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.cli import config_from_args
    from lmeye.entry import run_stage
    from pipelines.download import run

    cfg = config_from_args(args, **{"download.input": args.input, "download.output": args.output})
    return run_stage(run, cfg)
