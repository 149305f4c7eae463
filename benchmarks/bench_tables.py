"""What the table benchmarks share (``manifest.py``, ``rerun.py``, ``instruct_memory.py``): a
scratch folder removed at the end, and a synthetic table committed shard by shard."""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.tables import TableWriter  # noqa: E402
from schemas import TableSchema  # noqa: E402


@contextmanager
def scratch(prefix: str) -> Iterator[str]:
    """A temporary folder for one benchmark run, removed however the run ends."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_table(path: str, table: TableSchema, config: dict[str, Any], shards: int,
                commit: Callable[[TableWriter, int], str], finalize: bool = True) -> tuple[TableWriter, list[str]]:
    """A table at ``path`` of ``shards`` shards, shard i committed by ``commit(writer, i)``, which
    returns its name; finalized (a finished table) unless ``finalize`` is False."""
    writer = TableWriter(path, table, config=config)
    names = [commit(writer, i) for i in range(shards)]
    if finalize:
        writer.finalize(names, stats={})
    return writer, names
