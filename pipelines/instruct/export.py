"""The instructions table as Hugging Face ``datasets`` sees it: shard files by split, and the
``DatasetDict`` export (``--export-hf``). A split without rows has no shard, so it is absent
rather than empty (``datasets`` cannot load a 0-row Parquet split)."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from lmeye.tables import TableReader, open_table
from schemas.instructions import INSTRUCTIONS, SPLITS


def split_files(path: str) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the shard paths of a finished table, by split;
    a split with no rows is left out."""
    reader: TableReader = open_table(path, INSTRUCTIONS)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, file in zip(reader.shard_names, reader.files):
        out[name.split("-", 1)[0]].append(file)
    return {s: files for s, files in out.items() if files}


def export_hf(path: str, out_dir: str) -> Any:
    """Write the table as a ``datasets.DatasetDict`` (its non-empty splits) that
    ``load_from_disk`` opens. Streams through the Arrow cache of ``datasets``."""
    import datasets

    files = split_files(path)
    cache = tempfile.mkdtemp(prefix="lingcloud-hf-")
    try:
        dd = datasets.load_dataset("parquet", data_files=files, cache_dir=cache) if files else datasets.DatasetDict()
        dd.save_to_disk(out_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return dd
