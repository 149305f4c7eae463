"""`lmeye predict [INSTRUCTIONS] [PREDICTIONS] --set predict.checkpoint=DIR [--config FILE]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_stage_command

    p = add_stage_command(
        sub, "predict",
        help="answer the questions of an instructions table with a trained IPN into a predictions table (Ray Data)",
        description="Answer the last user turn of every row (of predict.split) of an instructions-style table with a "
        "trained IPN, image features read from the feature store. Finished shards are skipped on a rerun.",
        positionals=[("instructions", "predict.input", "instructions table (default: predict.input, else instruct.output)"),
                     ("predictions", "predict.output", "predictions table to write (default: {data.root}/predictions)")],
    )
    p.add_argument("--checkpoint", dest="_checkpoint", metavar="DIR", help="shorthand for --set predict.checkpoint=DIR")
    run = p.get_default("func")

    def with_checkpoint(args: argparse.Namespace) -> int:
        if args._checkpoint:
            args.overrides.append(f"predict.checkpoint={args._checkpoint}")
        return run(args)

    p.set_defaults(func=with_checkpoint)
