"""The shared body of every `jobs/<stage>.py` entry point and `lmeye <stage>` command:
load the config, run one stage, print its summary, exit non-zero on failure."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from lmeye.config import Config, load_config
from lmeye.errors import user_errors
from lmeye.report import StageSummary
from lmeye.stages import run_recorded

StageFn = Callable[[Config], StageSummary]


def run_stage(stage: StageFn, cfg: Config) -> int:
    # Stages connect to Ray themselves (lmeye.runtime.init_ray, idempotent), after checking
    # their inputs, so a bad input fails in a second instead of after Ray's start-up.
    summary = run_recorded(stage, cfg)  # a registered stage's manifest gets its provenance
    print(summary.render(), flush=True)
    return 0 if summary.ok else 1


def job_main(stage: StageFn, argv: list[str] | None = None, description: str = "") -> int:
    """`python jobs/<stage>.py --config FILE [--set k=v ...]`, as run by `ray job submit`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:  # a bad config and a bad input alike: one line, exit 2
        return run_stage(stage, load_config(args.config, args.overrides))
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
