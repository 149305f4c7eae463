"""Who wrote a table, and from what: the ``provenance`` record of its manifest.

A stage's driver runs inside ``recording(...)`` (``lmeye.stages.run`` sets it up); the
``TableWriter`` of the stage's output table stamps the record into ``_manifest.json``:

* ``stage``: the stage that wrote the table (a key of ``lmeye.stages.STAGES``);
* ``inputs``: ``{role: path}`` of what it read (``{"pairs": "s3://b/root/pairs"}``);
* ``input_versions``: ``{role: version}`` of those inputs when the run started: a table's
  version (``lmeye.store.table_version``: schema + every shard's checksum), or for plain files
  a digest of their listing (name, size, modification time);
* ``config``: the run's whole config (``dump_config``), from which ``lmeye regenerate``
  reruns the stage;
* ``host``, ``started``: where and when the run began.

This module imports nothing of LingCloud, so ``lmeye.tables`` can use it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


class ConfigChanged(Exception):
    """Raised by ``TableWriter`` when the run would replace a table written under another
    config, and the caller asked to keep versions (``lmeye regenerate``). Nothing is written."""

    def __init__(self, path: str, old: str, new: str):
        super().__init__(f"{path}: written with config {old}, this run's config is {new}")
        self.path, self.old, self.new = path, old, new


@dataclass
class Recording:
    output: str  # the table this run writes; other tables it may write get no record
    record: dict[str, Any] = field(default_factory=dict)
    keep_versions: bool = False  # raise ConfigChanged instead of replacing another config's table


_CURRENT: contextvars.ContextVar[Optional[Recording]] = contextvars.ContextVar("lingcloud_provenance", default=None)


def same_path(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


@contextlib.contextmanager
def recording(output: str, record: dict[str, Any], *, keep_versions: bool = False) -> Iterator[Recording]:
    token = _CURRENT.set(Recording(output, record, keep_versions))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def for_output(path: str) -> Optional[Recording]:
    """The active recording if ``path`` is its output table, else None."""
    rec = _CURRENT.get()
    return rec if rec is not None and same_path(rec.output, path) else None
