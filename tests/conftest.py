"""Shared fixtures: small synthetic tables built in-process, no network, no Ray."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from lmeye.demo.corpus import generate_items, render, write_corpus  # noqa: E402
from lmeye.demo.server import DemoServer  # noqa: E402
from lmeye.tables import TableWriter  # noqa: E402
from lmeye.uid import uid_for  # noqa: E402
from schemas.pairs import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, PAIRS, SUCCESS  # noqa: E402


def build_pairs_table(
    path: str | Path,
    num_images: int = 12,
    *,
    shards: int = 2,
    seed: int = 0,
    size: int = 32,
    corrupt: int = 1,
    failed: int = 1,
) -> pa.Table:
    """Write a `pairs` table as the download stage would, without downloading.

    Rows: ``num_images`` good demo images, then ``corrupt`` rows marked success whose bytes
    are not an image (to exercise decode failures downstream), then ``failed`` rows that
    failed to download. Returns the concatenated table.
    """
    items = generate_items(num_images, seed=seed)
    rows = []
    for item in items:
        img = render(item, size=size)
        url = f"http://127.0.0.1/images/{item.name}"
        rows.append(
            dict(uid=uid_for(url), url=url, caption=item.caption, status=SUCCESS, error_message=None,
                 width=size, height=size, original_width=size, original_height=size,
                 sha256=hashlib.sha256(img).hexdigest(), image=img)
        )
    for i in range(corrupt):
        url = f"http://127.0.0.1/images/corrupt_{i}.jpg"
        rows.append(dict(uid=uid_for(url), url=url, caption="not an image", status=SUCCESS, error_message=None,
                         width=size, height=size, original_width=size, original_height=size,
                         sha256=None, image=b"this is not a jpeg"))
    for i in range(failed):
        url = f"http://127.0.0.1/images/missing_{i}.jpg"
        rows.append(dict(uid=uid_for(url), url=url, caption="missing", status=FAILED_TO_DOWNLOAD,
                         error_message="HTTP Error 404: Not Found", width=None, height=None,
                         original_width=None, original_height=None, sha256=None, image=None))
    table = pa.Table.from_pylist(rows, schema=PAIRS.with_metadata(PAIRS.schema))
    writer = TableWriter(str(path), PAIRS, config={"fixture": "pairs", "seed": seed})
    per = max(1, -(-table.num_rows // shards))
    names = []
    for k, start in enumerate(range(0, table.num_rows, per)):
        name = f"{k:05d}.parquet"
        writer.write(name, table.slice(start, per))
        names.append(name)
    counts = pa.compute.value_counts(table["status"]).to_pylist()
    writer.finalize(names, stats={"by_status": {c["values"]: c["counts"] for c in counts}})
    return table


@pytest.fixture
def make_pairs(tmp_path: Path) -> Callable[..., tuple[Path, pa.Table]]:
    """``make_pairs(num_images=12, ...) -> (path, table)``: a finished pairs table under tmp_path."""

    def make(name: str = "pairs", **kwargs) -> tuple[Path, pa.Table]:
        path = tmp_path / name
        return path, build_pairs_table(path, **kwargs)

    return make


def build_features_table(path: str | Path, uids: list[str], failed: list[str] = (), *, dim: int = 4,
                         shards: int = 2) -> Path:
    """Write a `features` table as the extract stage would, without a model: a deterministic
    unit ``embedding`` of width ``dim`` per uid, and ``failed`` uids as failed_to_decode rows."""
    import numpy as np

    from schemas.features import FAILED_TO_DECODE, FEATURES, features_schema

    schema = features_schema(dim, "float32")
    rows = [(u, SUCCESS, None) for u in uids] + [(u, FAILED_TO_DECODE, "cannot identify image file") for u in failed]
    vectors = []
    for u, status, _ in rows:
        v = np.frombuffer(hashlib.sha256(u.encode()).digest()[: 4 * dim], dtype=np.uint8)[:dim].astype(np.float32) + 1
        vectors.append((v / np.linalg.norm(v)).tolist() if status == SUCCESS else None)
    table = pa.table({"uid": [r[0] for r in rows], "status": [r[1] for r in rows], "error_message": [r[2] for r in rows],
                      "embedding": vectors}, schema=schema)
    writer = TableWriter(str(path), FEATURES, config={"fixture": "features", "dim": dim})
    per = max(1, -(-table.num_rows // shards))
    names = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), per)):
        names.append(f"{k:05d}.parquet")
        writer.write(names[-1], table.slice(start, per))
    writer.finalize(names, stats={}, metadata={"embed_dim": str(dim), "dtype": "float32"})
    return Path(path)


__all__ = ["build_pairs_table", "build_features_table", "FAILED_TO_RESIZE"]


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (starting Ray costs seconds). 2 CPUs, as in CI."""
    import ray

    from lmeye.config import RayConfig
    from lmeye.runtime import init_ray

    started = init_ray(RayConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """20 demo images (48 px) plus the corpus's broken entries, written once per session."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_images=20, seed=1, image_size=48)


@pytest.fixture(scope="session")
def demo_server(demo_corpus):
    """The loopback HTTP server over ``demo_corpus``; tests may ``clear_log()`` and read ``requests``."""
    with DemoServer(demo_corpus.root) as srv:
        yield srv
