"""Regeneration: rebuild a table from what its manifest recorded (stage, config, inputs).

* **Up to date** (complete, every shard file intact, every input still the version it was
  built from, no config change): nothing runs.
* **Inputs changed** (a shard rewritten or added upstream): the stage reruns in place with the
  recorded config. The stages skip every output shard whose config and input fingerprints
  still match, so only shards derived from changed or new input shards are recomputed.
* **Config changed** (``--set extract.model=...``): when the stage's content fingerprint
  differs from the table's, the table is left as it is and the new one is written beside it,
  at ``<DIR>@<new config fingerprint>`` (an existing ``@<fingerprint>`` suffix is replaced, so
  versions do not nest). Consumers pinned to ``DIR`` keep reading the old version. A change
  that leaves the fingerprint alone (batch sizes, pool sizes) reruns in place and skips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import fsspec

from lmeye.config import Config, ConfigError, dump_config, load_config, parse_overrides
from lmeye.errors import UserError
from lmeye.provenance import ConfigChanged
from lmeye.report import StageSummary
from lmeye.stages import STAGES, Stage, input_paths, run, version_of
from lmeye.tables import MANIFEST, Manifest, overwriting, shard_file

VERSION_SUFFIX = re.compile(r"@[0-9a-f]{16}$")


@dataclass
class Plan:
    path: str
    stage: Stage
    cfg: Config
    manifest: Manifest
    reasons: list[str] = field(default_factory=list)  # why it must rerun; empty: up to date
    config_changes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    path: str  # the table written: the one asked for, or its new version
    action: str  # "up-to-date" | "updated" | "new-version"
    reasons: list[str]
    summary: Optional[StageSummary] = None
    replaced: str = ""  # new-version: the table left as it was


def version_path(path: str, config_fingerprint: str) -> str:
    return VERSION_SUFFIX.sub("", path.rstrip("/")) + "@" + config_fingerprint


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def plan(path: str, overrides: Iterable[str] = ()) -> Plan:
    """What rerunning ``path``'s stage would mean, without running it."""
    manifest = Manifest.load(path)
    if manifest is None:
        raise UserError(f"{path}/{MANIFEST}: not found; is {path} a table written by LingCloud?")
    prov = manifest.provenance or {}
    stage = STAGES.get(prov.get("stage", ""))
    if stage is None or not prov.get("config"):
        raise UserError(
            f"{path}/{MANIFEST}: records no stage run to repeat (written before provenance was recorded, "
            f"or not by a stage); rebuild it once with its stage command"
        )
    recorded = dict(prov["config"])
    flat = _flatten(recorded) | {stage.output: path}
    try:
        cfg = load_config(None, flat | parse_overrides(overrides))
        baseline = dump_config(load_config(None, flat))
    except ConfigError as err:
        raise UserError(f"{path}: the recorded config with these overrides does not load: {err}") from None
    p = Plan(path=path, stage=stage, cfg=cfg, manifest=manifest)
    p.config_changes = _diff(baseline, dump_config(cfg))
    p.reasons += [f"config {c}" for c in p.config_changes]
    if not manifest.complete:
        p.reasons.append("the table is incomplete")
    fs, root = fsspec.core.url_to_fs(path)
    for name, info in sorted(manifest.shards.items()):
        try:
            intact = fs.size(root.rstrip("/") + "/" + shard_file(name)) == info.bytes
        except FileNotFoundError:
            intact = False
        if not intact:
            p.reasons.append(f"shard {name} is missing or not the size recorded")
    built_from = prov.get("input_versions") or {}
    for role, in_path in sorted(input_paths(stage, dump_config(cfg)).items()):
        now, then = version_of(in_path), built_from.get(role, "")
        if now != then:
            p.reasons.append(f"input {role} ({in_path}) changed: version {then or '?'} -> {now or 'missing'}")
    return p


def regenerate(path: str, overrides: Iterable[str] = ()) -> Outcome:
    """Rebuild ``path`` as ``plan`` says; see the module doc for the three cases."""
    p = plan(path, overrides)
    if not p.reasons:
        return Outcome(path=path, action="up-to-date", reasons=[])
    try:
        # Changed inputs replace the derived shards in place: regenerating is the user's consent to
        # that (--overwrite); a changed content config still goes to a new version (ConfigChanged).
        with overwriting(True):
            summary = run(p.stage, p.cfg, keep_versions=True)
        return Outcome(path=path, action="updated", reasons=p.reasons, summary=summary)
    except ConfigChanged as changed:
        new_path = version_path(path, changed.new)
        cfg = load_config(None, _flatten(dump_config(p.cfg)) | {p.stage.output: new_path})
        summary = run(p.stage, cfg)
        reasons = p.reasons + [f"config fingerprint {changed.old} -> {changed.new}: a new version"]
        return Outcome(path=new_path, action="new-version", reasons=reasons, summary=summary, replaced=path)
