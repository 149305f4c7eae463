"""The stage registry: what each stage reads and writes, and running one with its provenance.

``STAGES`` maps a stage's name to where its ``run(cfg)`` lives and which config keys hold its
output and its inputs. Lineage and regeneration work from this table alone, so a new stage is
one entry here, not a branch in their code.
"""

from __future__ import annotations

import importlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import fsspec

from lmeye import provenance
from lmeye.config import Config, dump_config
from lmeye.report import StageSummary
from lmeye.tables import Manifest, NotATableFolder, fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function" of its run(cfg) -> StageSummary
    table: str  # what it writes: a table name of schemas/ ("features"), or "checkpoint"
    output: str  # config key of the output path
    inputs: dict[str, str] = field(default_factory=dict)  # role -> config key of an input path

    def entry(self) -> Callable[[Config], StageSummary]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("download", "pipelines.download:run", "pairs", "download.output", {"urls": "download.input"}),
        Stage("extract", "pipelines.extract:run", "features", "extract.output", {"pairs": "extract.input"}),
        Stage("curate", "pipelines.curate:run", "curation", "curate.output",
              {"pairs": "curate.pairs", "features": "curate.features"}),
        Stage("instruct", "pipelines.instruct:run", "instructions", "instruct.output",
              {"pairs": "instruct.pairs", "features": "instruct.features", "curation": "instruct.curation"}),
        Stage("train", "pipelines.train:run", "checkpoint", "train.output",
              {"instructions": "train.instructions", "features": "train.features", "curation": "train.curation"}),
    )
}
BY_TABLE = {s.table: s for s in STAGES.values()}


def by_entry(fn: Callable[..., Any]) -> Optional[Stage]:
    """The registered stage whose run function ``fn`` is (None for anything else)."""
    target = f"{fn.__module__}:{fn.__name__}"
    return next((s for s in STAGES.values() if s.target == target), None)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def input_paths(stage: Stage, config: dict[str, Any]) -> dict[str, str]:
    """``{role: path}`` of the stage's inputs named in ``config`` (unset ones left out)."""
    out = {}
    for role, key in stage.inputs.items():
        value = config_value(config, key)
        if isinstance(value, str) and value:
            out[role] = value
    return out


def manifest_of(path: str) -> Optional[Manifest]:
    """The table manifest at ``path``; None for anything else (a file, a plain folder, nothing)."""
    try:
        return Manifest.load(path)
    except (NotADirectoryError, IsADirectoryError, NotATableFolder):
        return None


def version_of(path: str) -> str:
    """A table's version (schema + shard checksums); for anything else, a digest of its file
    listing (names, sizes, modification times); "" when nothing is there."""
    from lmeye.store import table_version

    manifest = manifest_of(path)
    if manifest is not None:
        return table_version(manifest)
    try:
        fs, root = fsspec.core.url_to_fs(path)
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except (FileNotFoundError, OSError):
        return ""
    listing = sorted(
        (name[len(root):], info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""))
        for name, info in found.items()
    )
    return fingerprint(listing) if listing else ""


def record_for(stage: Stage, cfg: Config) -> dict[str, Any]:
    """The provenance record of a run of ``stage`` with ``cfg`` (see lmeye/provenance.py)."""
    config = dump_config(cfg)
    inputs = input_paths(stage, config)
    return {
        "stage": stage.name,
        "inputs": inputs,
        "input_versions": {role: version_of(path) for role, path in inputs.items()},
        "config": config,
        "host": socket.gethostname(),
        "started": time.time(),
    }


def run(stage: Stage, cfg: Config, *, keep_versions: bool = False) -> StageSummary:
    """Run a stage with its provenance recorded into its output table's manifest."""
    output = config_value(dump_config(cfg), stage.output)
    with provenance.recording(output, record_for(stage, cfg), keep_versions=keep_versions):
        return stage.entry()(cfg)


def run_recorded(fn: Callable[[Config], StageSummary], cfg: Config) -> StageSummary:
    """``fn(cfg)``, recorded when ``fn`` is a registered stage (``lmeye.entry.run_stage`` uses this)."""
    stage = by_entry(fn)
    return fn(cfg) if stage is None else run(stage, cfg)
