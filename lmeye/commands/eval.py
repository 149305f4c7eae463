"""`lmeye eval mme|mmbench|seedbench --checkpoint DIR --data PATH [--out DIR]`: score a trained IPN on
a benchmark's released layout; writes ``<out>/<benchmark>.json`` and ``<out>/<benchmark>.md``."""

from __future__ import annotations

import argparse

from lmeye.eval import BENCHMARKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a checkpoint on MME, MMBench or SEED-Bench", description=__doc__.split("\n")[0])
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("--checkpoint", required=True, help="folder written by training (IPN save_pretrained)")
    p.add_argument("--data", required=True, help="MME: the root folder; MMBench: the TSV; SEED-Bench: the JSON (or its folder)")
    p.add_argument("--features", help="the features table the model was trained on (default: the one its ipn_config.json names)")
    p.add_argument("--out", default="eval_results", help="folder for the JSON result and Markdown table (default: eval_results)")
    p.add_argument("--image-dir", help="SEED-Bench only: image folder (default: SEED-Bench-image/ beside the JSON)")
    p.add_argument("--limit", type=int, help="score only the first N questions (MME: images)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length for MME and MMBench (default 32)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.errors import UserError
    from lmeye.eval import ipn_answerer
    from lmeye.eval.common import headline
    from lmeye.eval.run import evaluate

    if args.image_dir and args.benchmark != "seedbench":
        raise UserError("--image-dir is for seedbench only")
    answerer = ipn_answerer.build_answerer(args.checkpoint, max_new_tokens=args.max_new_tokens, features=args.features)
    result = evaluate(args.benchmark, answerer, args.data, args.out, args.limit, args.image_dir)
    print(f"[eval {args.benchmark}] {headline(result)}; wrote {args.out}/{args.benchmark}.json and .md")
    return 0
