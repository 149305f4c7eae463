"""The commit journal of a table: shard records committed since the manifest was last written.

A commit must cost the same at the 100,000th shard as at the first, so it never rewrites
``_manifest.json``; it adds one record here, and the table's writer folds the journal into the
manifest (compaction) when it opens the table and when it finishes. Records belong to one
*epoch* (the manifest's): a compaction starts a new epoch, so records left by a crash after
the manifest was written but before the old journal was removed are never read again.

Two layouts, by what the store can do:

* a local disk appends: ``_journal/<epoch>.jsonl``, one JSON line a commit (one ``write``);
  a process killed mid-``write`` can leave a last line without its newline: that commit never
  returned, so the line is ignored and its shard redone;
* an object store has no append but makes each object appear whole:
  ``_journal/<epoch>/<shard>.json``, one small object a commit; a read lists the epoch's
  folder once and fetches its objects in one batched call.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import fsspec

from schemas import SchemaError

JOURNAL = "_journal"


def _folder(root: str) -> str:
    return root.rstrip("/") + "/" + JOURNAL


def append(fs: fsspec.AbstractFileSystem, root: str, epoch: str, record: dict[str, Any], *, appendable: bool) -> None:
    """Commit one shard record (``record["name"]``) under ``epoch``."""
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    if appendable:
        fs.makedirs(_folder(root), exist_ok=True)
        with fs.open(f"{_folder(root)}/{epoch}.jsonl", "ab") as f:
            f.write((blob + "\n").encode())
        return
    fs.pipe_file(f"{_folder(root)}/{epoch}/{record['name']}.json", blob.encode())


def read(fs: fsspec.AbstractFileSystem, root: str, epoch: str, where: str) -> list[dict[str, Any]]:
    """The records committed under ``epoch``, oldest first (both layouts are looked for, so a
    table moved between a disk and a bucket still reads). ``where`` names the table in errors."""
    records: list[dict[str, Any]] = []
    lines = f"{_folder(root)}/{epoch}.jsonl"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        text = fs.cat_file(lines).decode()
        complete, _, _torn = text.rpartition("\n")  # a last line without newline: never committed
        for number, line in enumerate(complete.splitlines() if complete else [], 1):
            records.append(_parse(line, f"{where}/{JOURNAL}/{epoch}.jsonl, line {number}"))
    folder = f"{_folder(root)}/{epoch}"
    fs.invalidate_cache(folder)
    try:
        objects = sorted(f for f in fs.ls(folder, detail=False) if f.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        objects = []
    if objects:
        for f, blob in sorted(fs.cat(objects, on_error="raise").items()):
            records.append(_parse(blob.decode(), f"{where}/{JOURNAL}/{epoch}/{os.path.basename(f)}"))
    return records


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or "name" not in record:
            raise ValueError("not a shard record")
        return record
    except ValueError as err:
        raise SchemaError(f"{where}: unreadable journal entry ({err})") from None


def clear(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove the whole journal: called right after a compaction wrote every record's shard."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(_folder(root), recursive=True)
