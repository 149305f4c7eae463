"""Full checksum verification of a table: every shard's bytes against its manifest record.

A rerun trusts a shard's size and the store's version mark (``TableWriter.is_done``), which
reads metadata only. Re-reading every byte is this separate, explicit check: Ray tasks, a
batch of shards each, run where Ray places them (so a table on object storage is read by
many nodes at once, not through one process), each returning only its mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec

from lmeye.config import RayConfig
from lmeye.errors import UserError
from lmeye.tables import MANIFEST, Manifest, file_sha256, shard_file


@dataclass
class Mismatch:
    file: str  # the shard's file, with the table's path
    problem: str  # "missing", "size ...", "sha256 ..."

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


@dataclass
class Verification:
    path: str
    shards: int
    bytes: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_shards(path: str, shards: list[tuple[str, int, str]]) -> list[Mismatch]:
    """(shard name, recorded bytes, recorded sha256) -> the mismatches among them. Runs in a task."""
    fs, root = fsspec.core.url_to_fs(path)
    out = []
    for name, size, sha in shards:
        where = f"{path.rstrip('/')}/{shard_file(name)}"
        found = file_sha256(fs, f"{root.rstrip('/')}/{shard_file(name)}")
        if found is None:
            out.append(Mismatch(where, "missing"))
            continue
        actual = fs.size(f"{root.rstrip('/')}/{shard_file(name)}")
        if actual != size:
            out.append(Mismatch(where, f"size {actual} bytes, manifest records {size}"))
        elif found != sha:
            out.append(Mismatch(where, f"sha256 {found}, manifest records {sha}"))
    return out


def verify(path: str, *, shards_per_task: int = 16, ray_cfg: RayConfig | None = None) -> Verification:
    """Hash every shard ``path``'s manifest lists (committed ones included) in Ray tasks."""
    from lmeye.runtime import init_ray, storage_runtime_env

    manifest = Manifest.load(path)
    if manifest is None:
        raise UserError(f"{path}/{MANIFEST}: not found; is {path} a table written by LingCloud?")
    records = [(s.name, s.bytes, s.sha256) for _, s in sorted(manifest.shards.items())]
    result = Verification(path, len(records), sum(r[1] for r in records))
    if not records:
        return result
    init_ray(ray_cfg)
    import ray

    task = ray.remote(check_shards).options(runtime_env=storage_runtime_env())
    refs = [task.remote(path, records[i:i + shards_per_task]) for i in range(0, len(records), shards_per_task)]
    for found in ray.get(refs):
        result.mismatches.extend(found)
    result.mismatches.sort(key=lambda m: m.file)
    return result
