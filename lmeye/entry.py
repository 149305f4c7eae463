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

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
INTERRUPTED = "interrupted; rerun the same command to resume"
OVERWRITE_HELP = ("replace an output table built from other inputs or another content config "
                  "(without it the stage refuses; the summary says how many rows were replaced)")


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_stage(stage: StageFn, cfg: Config, *, overwrite: bool = False) -> int:
    """Run one stage and print its summary: 0 done, 1 incomplete, 130 interrupted (Ctrl-C).

    Stages connect to Ray themselves (lmeye.runtime.init_ray, idempotent), after checking
    their inputs, so a bad input fails in a second instead of after Ray's start-up.
    """
    from lmeye.tables import Manifest, overwriting

    try:
        with overwriting(overwrite):
            summary = run_recorded(stage, cfg)  # a registered stage's manifest gets its provenance
    except KeyboardInterrupt:
        # Every stage commits finished shards as it goes: the rerun resumes from them.
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if overwrite and summary.ok:
        manifest = Manifest.load(summary.output)
        if manifest is not None and manifest.replaced_rows is not None:
            summary.notes.append(f"--overwrite: replaced {manifest.replaced_rows} row(s) of a table "
                                 "built from other inputs or config")
    print(summary.render(), flush=True)
    return 0 if summary.ok else 1


def job_main(stage: StageFn, argv: list[str] | None = None, description: str = "") -> int:
    """`python jobs/<stage>.py --config FILE [--set k=v ...] [--overwrite]`, as run by `ray job submit`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_overwrite_arg(parser)
    args = parser.parse_args(argv)
    try:  # a bad config and a bad input alike: one line, exit 2
        return run_stage(stage, load_config(args.config, args.overrides), overwrite=args.overwrite)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading the config or importing
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
