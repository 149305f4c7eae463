"""`lmeye model describe`: the IPN's parameter counts, part by part; with --llm, how the IPN talks to an LLM."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.model.describe import add_arguments, run

    p = sub.add_parser("model", help="inspect the IPN model")
    verbs = p.add_subparsers(dest="verb", required=True)
    d = verbs.add_parser("describe", help="parameter count of each IPN part and the trainable fraction; --llm DIR: the LLM's template, loss mask and stop tokens")
    add_arguments(d)
    d.set_defaults(func=run)
