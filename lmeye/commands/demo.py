"""`lmeye demo [--config configs/demo.yaml]`: the whole pipeline end to end on an embedded local Ray."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_config_args

    p = sub.add_parser("demo", help="run the offline demo pipeline end to end")
    add_config_args(p)
    p.add_argument("--verbose", action="store_true", help="show Ray's and the stages' own output here (default: in {data.root}/logs/demo.log)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.cli import config_from_args
    from lmeye.demo.run import run_demo

    summaries = run_demo(config_from_args(args), verbose=args.verbose, stop_ray=True)
    return 0 if all(s.ok for s in summaries) else 1
