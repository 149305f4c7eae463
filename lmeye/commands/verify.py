"""`lmeye verify TABLE`: re-read every shard and compare it with its manifest record."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-read every shard of a table and check its size and sha256 against the manifest (Ray tasks)",
        description="A rerun recognises a finished shard by its size and the store's version mark (metadata "
        "only). This command reads every byte: each shard's sha256 is computed in Ray tasks and compared with "
        "the manifest; every mismatch is printed, and the exit code is 1 when there is any.",
    )
    p.add_argument("table", help="the table folder (holding _manifest.json); local, s3:// or gs://")
    p.add_argument("--shards-per-task", type=int, default=16, help="shards hashed by one Ray task")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.verify import verify

    result = verify(args.table, shards_per_task=max(1, args.shards_per_task))
    for m in result.mismatches:
        print(f"MISMATCH {m}")
    print(f"{args.table}: {result.shards} shard(s), {result.bytes} bytes checked: "
          + ("all match the manifest" if result.ok else f"{len(result.mismatches)} mismatch(es)"))
    return 0 if result.ok else 1
