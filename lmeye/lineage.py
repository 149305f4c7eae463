"""Lineage: the chain of tables (and checkpoints) behind a table, from what they recorded.

A table's ``_manifest.json`` carries its provenance (``lmeye/provenance.py``): the stage, the
input paths by role and their versions when it was built, and the run's config. A checkpoint
folder carries the same record in ``lineage.json`` (see ``write_checkpoint_lineage``).
``lineage(path)`` follows the inputs recursively and says, for every node, whether the input
it was built from is still the version it read.

Tables written before provenance was recorded have none; their inputs are then inferred from
the stage registry and the default layout (``{data.root}/<table>`` siblings), and marked so.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import fsspec

from lmeye.errors import UserError
from lmeye.stages import BY_TABLE, STAGES, input_paths, manifest_of, record_for, version_of
from lmeye.tables import MANIFEST, Manifest, code_version, fingerprint
from schemas.curation import CURATION

CHECKPOINT_LINEAGE = "lineage.json"


class NoLineage(UserError):
    """The path holds neither a table manifest nor a checkpoint's lineage.json."""


@dataclass
class Node:
    path: str
    role: str = ""  # how the node below uses this one ("pairs", "features", ...); "" for the root
    kind: str = "missing"  # table | checkpoint | files | missing
    table: str = ""
    stage: str = ""
    version: str = ""
    config_fingerprint: str = ""
    code_version: str = ""
    built: Optional[float] = None
    complete: Optional[bool] = None
    rows: Optional[int] = None
    recorded: bool = False  # provenance read from the record (False: inferred from the layout)
    input_version: str = ""  # the version of this node its consumer was built from
    changed_since: Optional[bool] = None  # this node is no longer the version its consumer read
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> rows, sha256, input shards
    filters: dict[str, Any] = field(default_factory=dict)  # a curation table: the filters and thresholds that chose its rows
    inputs: list["Node"] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with fsspec.open(path, "r") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as err:
        raise NoLineage(f"{path}: unreadable ({err})") from None


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."


def _inferred_inputs(stage_name: str, path: str) -> dict[str, str]:
    """Inputs by the default layout: the stage's input keys under ``data.root`` = the parent folder."""
    from lmeye.config import dump_config, load_config

    try:
        cfg = dump_config(load_config(None, {"data.root": _parent(path)}))
    except ValueError:
        return {}
    return input_paths(STAGES[stage_name], cfg)


def _table_node(path: str, manifest: Manifest, role: str) -> tuple[Node, dict[str, str], dict[str, str]]:
    prov = manifest.provenance or {}
    stage = prov.get("stage") or (BY_TABLE[manifest.table].name if manifest.table in BY_TABLE else "")
    recorded = bool(prov.get("stage"))
    inputs = dict(prov.get("inputs") or {}) if recorded else (_inferred_inputs(stage, path) if stage else {})
    from lmeye.store import table_version

    node = Node(
        path=path, role=role, kind="table", table=manifest.table, stage=stage, version=table_version(manifest),
        config_fingerprint=manifest.config_fingerprint, code_version=manifest.code_version,
        built=manifest.updated or prov.get("started"), complete=manifest.complete, rows=manifest.num_rows,
        recorded=recorded,
    )
    if manifest.table == CURATION.name:  # what decided which images training sees
        node.filters = {k: v for k, v in sorted(manifest.config.items()) if v is not None and v != []}
        kept = manifest.stats.get("kept")
        if kept is not None:
            node.filters["kept_rows"] = kept
    # Which table each shard's input shards came from: the stage's only table input, when it has one.
    table_inputs = [r for r, p in inputs.items() if manifest_of(p) is not None]
    source = inputs[table_inputs[0]] if len(table_inputs) == 1 else ""
    for name, info in sorted(manifest.shards.items()):
        node.shards[name] = {
            "rows": info.rows, "sha256": info.sha256,
            "inputs": [{"shard": s, "table": source} if source else {"shard": s} for s in info.inputs],
        }
    return node, inputs, dict(prov.get("input_versions") or {})


def _checkpoint_node(path: str, record: dict[str, Any], role: str) -> tuple[Node, dict[str, str], dict[str, str]]:
    prov = record.get("provenance", {})
    node = Node(
        path=path, role=role, kind="checkpoint", table="checkpoint", stage=prov.get("stage", ""),
        version=record.get("version", ""), config_fingerprint=record.get("config_fingerprint", ""),
        code_version=record.get("code_version", ""), built=record.get("built"), complete=True, recorded=True,
    )
    node.shards = {name: {"sha256": sha} for name, sha in sorted(record.get("files", {}).items())}
    return node, dict(prov.get("inputs") or {}), dict(prov.get("input_versions") or {})


def _checkpoint_record(path: str) -> Optional[dict[str, Any]]:
    """``lineage.json`` of a checkpoint folder, or of the training-stage folder holding it."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        return None
    for where in (path, _parent(path)):
        record = _read_json(_join(where, CHECKPOINT_LINEAGE))
        if record is not None:
            return record
    return None


def lineage(path: str, role: str = "", *, _seen: Optional[set[str]] = None) -> Node:
    """The node for ``path`` with its inputs, recursively (a cycle or a repeat is not followed twice)."""
    seen = set() if _seen is None else _seen
    key = path.rstrip("/")
    manifest = manifest_of(path)
    if manifest is not None:
        node, inputs, versions = _table_node(path, manifest, role)
    else:
        record = _checkpoint_record(path)
        if record is not None:
            node, inputs, versions = _checkpoint_node(path, record, role)
        else:
            version = version_of(path)
            if not role:
                raise NoLineage(f"{path}: no {MANIFEST} or {CHECKPOINT_LINEAGE}; is it a LingCloud table or checkpoint?")
            return Node(path=path, role=role, kind="files" if version else "missing", version=version)
    if key in seen:
        return node
    seen.add(key)
    for child_role, child_path in inputs.items():
        child = lineage(child_path, child_role, _seen=seen)
        child.input_version = versions.get(child_role, "")
        if child.input_version and child.version:
            child.changed_since = child.version != child.input_version
        node.inputs.append(child)
    return node


def write_checkpoint_lineage(directory: str, cfg, *, stage: str = "train", files: Optional[dict[str, str]] = None,
                             extra_inputs: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Write ``<directory>/lineage.json`` for a checkpoint (or a training stage's folder).

    The record: ``provenance`` (as in a table manifest: stage, inputs, input_versions, config),
    ``config_fingerprint`` (of the run's config), ``code_version``, ``built`` (epoch seconds),
    ``files`` (``{name: sha256}`` of what the folder holds; computed when not given) and
    ``version`` (a digest of ``files``). ``extra_inputs`` adds roles the config does not name,
    e.g. ``{"init": <the checkpoint this stage started from>}``.
    """
    import hashlib

    record = record_for(STAGES[stage], cfg)
    for role, path in (extra_inputs or {}).items():
        record["inputs"][role] = path
        record["input_versions"][role] = version_of(path)
    fs, root = fsspec.core.url_to_fs(directory)
    if files is None:
        files = {}
        for full in sorted(fs.find(root)):
            name = full[len(root.rstrip("/")) + 1:]
            if name != CHECKPOINT_LINEAGE:
                files[name] = hashlib.sha256(fs.cat_file(full)).hexdigest()
    out = {
        "kind": "checkpoint",
        "provenance": record,
        "config_fingerprint": fingerprint(record["config"]),
        "code_version": code_version(),
        "built": time.time(),
        "files": files,
        "version": fingerprint(files),
    }
    fs.pipe_file(_join(root, CHECKPOINT_LINEAGE), json.dumps(out, indent=1, sort_keys=True, default=str).encode())
    return out


def _when(ts: Optional[float]) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "?"


def render(node: Node, depth: int = 0, max_shards: int = 6) -> str:
    """The chain as an indented tree, one block per node, inputs below their consumer."""
    pad = "    " * max(0, depth - 1)
    first, rest = (pad + " └─ ", pad + "    ") if depth else ("", "  ")
    head = f"{node.role}: " if node.role else ""
    changed = "  [CHANGED since it was read]" if node.changed_since else ""
    if node.kind in ("files", "missing"):
        state = f"files, version {node.version}" if node.kind == "files" else "MISSING"
        return f"{first}{head}{node.path}  ({state}){changed}"
    state = "complete" if node.complete else "INCOMPLETE"
    lines = [
        f"{first}{head}{node.path}  [{node.kind}{' ' + node.table if node.kind == 'table' else ''}, stage {node.stage or '?'}, {state}]{changed}",
        f"{rest}version {node.version}  config {node.config_fingerprint}  code {node.code_version}  built {_when(node.built)}",
    ]
    if not node.recorded:
        lines.append(f"{rest}(no recorded provenance: inputs inferred from the folder layout)")
    if node.filters:
        lines.append(f"{rest}filters: " + ", ".join(f"{k}={v}" for k, v in node.filters.items()))
    if node.shards:
        rows = f", {node.rows} rows" if node.rows is not None else ""
        lines.append(f"{rest}{len(node.shards)} {'shards' if node.kind == 'table' else 'files'}{rows}:")
        for name, s in list(node.shards.items())[:max_shards]:
            src = ", ".join(i["shard"] for i in s.get("inputs", []))
            lines.append(f"{rest}  {name}  sha256 {s['sha256'][:12]}" + (f"  <- {src}" if src else ""))
        if len(node.shards) > max_shards:
            lines.append(f"{rest}  ... {len(node.shards) - max_shards} more (--json lists all)")
    lines += [render(child, depth + 1, max_shards) for child in node.inputs]
    return "\n".join(lines)
