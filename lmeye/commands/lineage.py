"""`lmeye lineage DIR [--json]`: the chain of tables (and checkpoints) behind a table."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lineage", help="the tables and checkpoints a table was built from: stage, config, code, input shards, when",
    )
    p.add_argument("dir", help="a table (folder with _manifest.json) or a checkpoint folder (lineage.json)")
    p.add_argument("--json", action="store_true", help="print the whole chain as JSON")
    p.add_argument("--max-shards", type=int, default=6, help="shards listed per table in the text form")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.lineage import lineage, render

    node = lineage(args.dir)
    print(json.dumps(node.to_dict(), indent=1, sort_keys=True) if args.json else render(node, max_shards=args.max_shards))
    return 0
