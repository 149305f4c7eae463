"""The train stage's output through fsspec: a local folder, ``s3://``, ``gs://`` alike.

Everything a stage keeps under ``{train.output}/{stage}/`` (``run.json``, ``summary.json``,
``metrics.jsonl``, ``attempts.jsonl``, ``loss.png``, ``model/``, Ray Train's ``checkpoint_*``) is
written and read here or by Ray Train through the same fsspec filesystem (``ray_storage``), never
with ``os``/``open``, which turned ``s3://bucket/...`` into a local folder named ``s3:``.

Object stores have no append and no rename: a file is written whole under its final key (an S3
PUT appears whole when it completes), and a JSON-lines log is kept as a local copy that is uploaded
whole (``JsonLines``). DeepSpeed writes its checkpoint to a local folder; Ray Train uploads that
folder to the run's storage and downloads it again on resume (``lmeye.train.checkpoint``).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from typing import Any, Callable, Optional

import fsspec

from lmeye.tables import is_local, version_mark


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def read_text(url: str) -> Optional[str]:
    """The file's text; None when there is no such file."""
    fs, path = _fs(url)
    try:
        with fs.open(path, "r") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_json(url: str) -> Optional[Any]:
    """The file's JSON; None when there is no such file or it is not JSON (a write cut short)."""
    text = read_text(url)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def write_bytes(url: str, data: bytes) -> None:
    """``url`` holds ``data``, written whole (its folder made on a local disk)."""
    fs, path = _fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=1, default=str).encode())


def is_dir(url: str) -> bool:
    fs, path = _fs(url)
    return fs.isdir(path)


def remove(url: str) -> None:
    """Remove the folder (or file) ``url`` and all under it, if there is one."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def glob(pattern: str) -> list[str]:
    """The sorted paths (with their protocol, as given) that match ``pattern``."""
    fs, path = _fs(pattern)
    return sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(path))


def listing(url: str) -> Optional[dict[str, list]]:
    """{name: [size, version mark]} of the files directly in folder ``url`` (None: no such folder):
    what changes when any of them is rewritten (``lmeye.tables.version_mark``)."""
    fs, path = _fs(url)
    if not fs.isdir(path):
        return None
    return {os.path.basename(e["name"].rstrip("/")): [e.get("size"), version_mark(e)]
            for e in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]) if e.get("type") == "file"}


def upload_dir(local: str, url: str) -> None:
    """The folder ``url`` becomes a copy of the local folder ``local`` (what was there is removed first)."""
    remove(url)
    fs, root = _fs(url)
    for folder, _, files in os.walk(local):
        rel = os.path.relpath(folder, local)
        for name in files:
            target = f"{root.rstrip('/')}/{name}" if rel == "." else f"{root.rstrip('/')}/{rel}/{name}"
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.put_file(os.path.join(folder, name), target)


def ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: a local folder as it is;
    anything else through this fsspec filesystem (pyarrow's own S3 client would ignore fsspec's and
    botocore's settings, e.g. ``AWS_ENDPOINT_URL``), its path without the protocol, as Ray Train wants."""
    fs, path = _fs(url)
    if is_local(fs):
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


class JsonLines:
    """A JSON-lines file in the run's output with one writer (rank 0), for records added one by one.

    Records go to a local copy; ``flush`` uploads the whole copy (object stores have no append),
    forced at checkpoints and at the end, otherwise at most every ``interval`` seconds, so a
    long run's growing file is not sent again every few steps. On open, the records already in the
    output that ``keep`` accepts are kept (a resumed run drops those of the steps it trains again)."""

    def __init__(self, url: str, keep: Callable[[dict], bool] = lambda record: True, interval: float = 60.0):
        self.url = url
        self.interval = interval
        self.local = os.path.join(tempfile.mkdtemp(prefix="lingcloud-log-"), os.path.basename(url))
        kept = [line for line in (read_text(url) or "").splitlines() if line.strip() and keep(json.loads(line))]
        with open(self.local, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        self.pending = False  # records not uploaded yet
        self.flushed = 0.0  # time of the last upload

    def append(self, record: dict[str, Any]) -> None:
        with open(self.local, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.pending = True

    def flush(self, force: bool = False) -> None:
        if not self.pending or (not force and time.time() - self.flushed < self.interval):
            return
        fs, path = _fs(self.url)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.put_file(self.local, path)
        self.pending = False
        self.flushed = time.time()
