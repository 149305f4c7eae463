"""`lmeye regenerate DIR [--set k=v] [--dry-run]`: rebuild a table from its manifest."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "regenerate",
        help="rebuild a table from its recorded stage, config and inputs: only what changed is recomputed",
        description="Rebuild a table from its manifest. Up to date: nothing runs. Changed inputs: only the "
        "shards derived from them are recomputed. A config change (--set) that changes the table's content "
        "writes a new version at DIR@<config fingerprint> and leaves DIR as it is.",
    )
    p.add_argument("dir", help="the table to rebuild")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="change one key of the recorded config, e.g. --set extract.model=ViT-B-16 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be rebuilt and why, run nothing")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmeye.regenerate import plan, regenerate

    if args.dry_run:
        p = plan(args.dir, args.overrides)
        if not p.reasons:
            print(f"{args.dir}: up to date (stage {p.stage.name}); nothing to recompute")
        else:
            print(f"{args.dir}: would rerun stage {p.stage.name}, because:")
            print("\n".join(f"  - {r}" for r in p.reasons))
        return 0
    out = regenerate(args.dir, args.overrides)
    if out.action == "up-to-date":
        print(f"{args.dir}: up to date (config, inputs and shards as recorded); nothing recomputed")
        return 0
    print("\n".join(f"  - {r}" for r in out.reasons))
    print(out.summary.render(), flush=True)
    if out.action == "new-version":
        print(f"new version written beside the old one: {out.path} ({out.replaced} is left as it was)")
    return 0 if out.summary.ok else 1
