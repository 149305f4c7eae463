"""Shared fixtures: small synthetic tables built in-process, no network, no Ray."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from lingcloud_testing import build_features_table, build_pairs_table  # noqa: E402,F401  (fixtures and older imports)

from lmeye.demo.corpus import write_corpus  # noqa: E402
from lmeye.demo.server import DemoServer  # noqa: E402


@pytest.fixture
def make_pairs(tmp_path: Path) -> Callable[..., tuple[Path, pa.Table]]:
    """``make_pairs(num_images=12, ...) -> (path, table)``: a finished pairs table under tmp_path."""

    def make(name: str = "pairs", **kwargs) -> tuple[Path, pa.Table]:
        path = tmp_path / name
        return path, build_pairs_table(path, **kwargs)

    return make


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


# Under `make test` (pytest-xdist, a file per worker at a time) the longest files go first, so that the
# two workers end together instead of one of them starting the two-node scenario at the very end.
LONGEST_FIRST = ("test_demo.py", "test_multinode.py", "pipelines/test_train.py",
                 "pipelines/test_extract.py", "pipelines/test_download.py", "pipelines/test_predict.py",
                 "test_object_storage.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: a file's tests stay together and in order
