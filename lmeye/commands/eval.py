"""`lmeye eval mme|mmbench|seedbench --checkpoint DIR --data PATH [--out DIR]`: score a trained IPN on
a benchmark's released layout; writes ``<out>/<benchmark>.json`` and ``<out>/<benchmark>.md``, and the
per-question records an interrupted run resumes from. ``--batch-size`` questions go to the model at
once; ``--workers N`` spreads them over N model copies (a Ray actor pool)."""

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
    p.add_argument("--batch-size", type=int, default=16, help="questions per model call (default 16)")
    p.add_argument("--workers", type=int, default=1, help="model copies answering at once, as a Ray actor pool (default 1: in this process)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="with --workers: GPUs each actor reserves (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.errors import UserError
    from lmeye.eval import ipn_answerer
    from lmeye.eval.common import headline
    from lmeye.eval.run import evaluate

    if args.image_dir and args.benchmark != "seedbench":
        raise UserError("--image-dir is for seedbench only")
    if args.batch_size < 1 or args.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    if args.workers > 1:
        from functools import partial

        from lmeye.eval.pool import PoolAnswerer
        from lmeye.runtime import init_ray

        ipn_answerer.features_check(args.checkpoint, args.features)  # a bad checkpoint: one line, before Ray starts
        init_ray()
        build = partial(ipn_answerer.build_answerer, args.checkpoint, max_new_tokens=args.max_new_tokens, features=args.features)
        answerer = PoolAnswerer(build, args.workers, ipn_answerer.model_name(args.checkpoint), args.gpus_per_worker)
    else:
        answerer = ipn_answerer.build_answerer(args.checkpoint, max_new_tokens=args.max_new_tokens, features=args.features)
    # each call carries a batch for every worker
    result = evaluate(args.benchmark, answerer, args.data, args.out, args.limit, args.image_dir, args.batch_size * args.workers)
    print(f"[eval {args.benchmark}] {headline(result)}; wrote {args.out}/{args.benchmark}.json and .md")
    return 0
