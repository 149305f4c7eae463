"""Table contracts: one Arrow schema per table, with its version.

This package is the one place a column is named. A stage builds its output with
``TABLE.schema`` (or ``TABLE.build(...)`` where the shape depends on the run, as for
feature dimensions), and every reader calls ``TABLE.check(schema, where)`` so that a
file written by other code, or by an older version, fails with a message naming the
file and the column instead of a KeyError deep inside a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

TypeRule = Callable[[pa.DataType], bool]

# Why a table written by an older schema version cannot be read, and what to do about it
# (README, "Migrating tables"). Keyed by the version the table was written with.
UID128_NOTE = (
    "uids are 128-bit (32 hex characters) since schema version 2, 64-bit before; regenerate the table "
    "by rerunning its stage (download, then extract and instruct) into a new folder, see README 'Migrating tables'"
)


class SchemaError(ValueError):
    """A table or file does not match its contract."""


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    schema: pa.Schema
    # Columns whose exact type is fixed per run (e.g. embedding width) are checked by a rule
    # instead of equality; the rule's docstring-less lambda is described by ``rules_doc``.
    type_rules: dict[str, TypeRule] = field(default_factory=dict)
    rules_doc: dict[str, str] = field(default_factory=dict)
    # older version -> what changed since and how to migrate (named in the version error)
    migrations: dict[int, str] = field(default_factory=dict)
    # older versions this code still reads as they are (a later version only added optional things)
    compatible: frozenset[int] = frozenset()

    def reads(self, version: int) -> bool:
        return version == self.version or version in self.compatible

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def metadata(self, extra: dict[str, str] | None = None) -> dict[bytes, bytes]:
        meta = {"lingcloud.table": self.name, "lingcloud.schema_version": str(self.version)}
        meta.update(extra or {})
        return {k.encode(): str(v).encode() for k, v in meta.items()}

    def with_metadata(self, schema: pa.Schema, extra: dict[str, str] | None = None) -> pa.Schema:
        return schema.with_metadata(self.metadata(extra))

    def check(self, actual: pa.Schema, where: str) -> None:
        """Raise SchemaError naming ``where`` and the first offending column."""
        version = (actual.metadata or {}).get(b"lingcloud.schema_version")
        if version is not None and not self.reads(int(version)):  # an old file: say so, not "missing column"
            raise SchemaError(self.version_mismatch(int(version), where))
        for expected in self.schema:
            if expected.name not in actual.names:
                raise SchemaError(
                    f"{where}: {self.name} table is missing column '{expected.name}' "
                    f"(has: {', '.join(actual.names)})"
                )
            got = actual.field(expected.name).type
            rule = self.type_rules.get(expected.name)
            ok = rule(got) if rule else got == expected.type
            if not ok:
                want = self.rules_doc.get(expected.name, str(expected.type))
                raise SchemaError(
                    f"{where}: column '{expected.name}' has type {got}, expected {want}"
                )

    def version_mismatch(self, found: int, where: str) -> str:
        """The message for a table or file written with schema version ``found``."""
        msg = f"{where}: {self.name} schema version {found}, this code reads version {self.version}"
        note = self.migrations.get(found)
        return f"{msg}: {note}" if note else msg

    def empty(self) -> pa.Table:
        return self.schema.empty_table()
