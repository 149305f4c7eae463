"""`lmeye store info DIR` and `lmeye store get DIR UID...`: the feature store from the shell."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="read a features table by uid (feature store)")
    verbs = p.add_subparsers(dest="verb", required=True)
    info = verbs.add_parser("info", help="rows, columns, model metadata and version of a features table")
    info.add_argument("dir", help="features table")
    info.add_argument("--version", help="pin a version id (16 hex digits, as `store info` prints; fails if the table is at another one)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    get = verbs.add_parser("get", help="print the vectors of one or more uids")
    get.add_argument("dir", help="features table")
    get.add_argument("uids", nargs="+", metavar="UID")
    get.add_argument("--columns", default="embedding", help="comma-separated: embedding, patch_tokens")
    get.add_argument("--version", help="pin a version id (16 hex digits, as `store info` prints; fails if the table is at another one)")
    get.add_argument("--mask", action="store_true", help="print 'missing' for unknown uids instead of failing")
    get.add_argument("--json", action="store_true", help="one JSON object per uid")
    get.set_defaults(func=_get)


def _open(args: argparse.Namespace):
    from lmeye.store import FeatureStore

    return FeatureStore.open(args.dir, version=args.version)


def _info(args: argparse.Namespace) -> int:
    info = _open(args).info()
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    print(f"features table {info['path']}")
    print(f"  version      {info['version']}" + ("" if info["current"] else "  (pinned; the table has moved on)"))
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(info["by_status"].items()))
    print(f"  rows         {info['rows_served']} served of {info['table_rows']} ({statuses})")
    for col, spec in info["columns"].items():
        stored = f" (stored {spec['encoding']})" if spec.get("encoding") and spec["encoding"] != spec["dtype"] else ""
        print(f"  {col:<12} {spec['dtype']} {' x '.join(map(str, spec['shape']))}{stored}")
    for k, v in sorted(info["metadata"].items()):
        print(f"  {k:<18} {v}")
    print(f"  serving copy {info['serving_copy']}")
    return 0


def _fmt(arr: np.ndarray) -> str:
    return " ".join(f"{float(x):.6g}" for x in np.asarray(arr, dtype=np.float32).reshape(-1))


def _get(args: argparse.Namespace) -> int:
    from lmeye.errors import UserError
    from lmeye.store import MissingUidError

    store = _open(args)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in columns if c not in store.columns]
    if unknown:
        raise UserError(f"{args.dir}: no column {', '.join(unknown)} (has: {', '.join(store.columns)})")
    try:
        res = store.get(args.uids, columns=columns, on_missing="mask" if args.mask else "raise")
    except MissingUidError as err:
        raise UserError(str(err)) from None
    for i, uid in enumerate(res.uids):
        if args.json:
            row = {"uid": uid, "found": bool(res.found[i])}
            if res.found[i]:
                row.update({c: np.asarray(res[c][i], dtype=np.float32).tolist() for c in columns})
            print(json.dumps(row))
        elif not res.found[i]:
            print(f"{uid}\tmissing")
        else:
            for c in columns:
                shape = "x".join(map(str, res[c][i].shape))
                print(f"{uid}\t{c}[{shape}]\t{_fmt(res[c][i])}")
    sys.stdout.flush()
    return 0
