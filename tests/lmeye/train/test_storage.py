"""The train stage's output through fsspec (``lmeye.train.storage``), on fsspec's in-memory filesystem:
like an object store it has no local path, and nothing here appends to a file in place."""

from __future__ import annotations

import json
import os

import fsspec
import pytest

from lmeye.train import storage
from lmeye.train.checkpoint import ATTEMPTS, TrainState
from lmeye.train.metrics import Metrics


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    root = "memory://lingcloud-test-run"
    yield root
    if fs.exists("/lingcloud-test-run"):
        fs.rm("/lingcloud-test-run", recursive=True)


def _lines(url: str) -> list[dict]:
    return [json.loads(line) for line in (storage.read_text(url) or "").splitlines()]


def test_json_lines_upload_whole_at_most_once_an_interval_unless_forced(bucket):
    url = f"{bucket}/s1/metrics.jsonl"
    log = storage.JsonLines(url, interval=3600)
    log.append({"step": 1})
    log.flush()  # the first upload: nothing was uploaded for an interval
    log.append({"step": 2})
    log.flush()  # within the interval: kept locally
    assert _lines(url) == [{"step": 1}]
    log.flush(force=True)  # a checkpoint or the end
    assert _lines(url) == [{"step": 1}, {"step": 2}]


def test_a_resumed_rank_0_keeps_the_lines_up_to_its_checkpoint_and_records_the_start(bucket):
    """A killed run had recorded steps 1-5, its last checkpoint was step 3: the resumed run trains
    steps 4 and 5 again, and each step keeps one line."""
    path = f"{bucket}/s1/metrics.jsonl"
    storage.write_bytes(path, "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)).encode())
    metrics = Metrics("s1", 0, path, total_steps=6, log_every=10**6, checkpoint_every=10**6)
    metrics.log_start(["node-a", "node-b"], resumed_step=3)
    state = TrainState(stage="s1", step=3)
    for _ in range(3):
        state.step += 1
        metrics.step(state, loss_rows=2.0, rows=4, tokens=40, lr=0.1, seconds=1.0)
    metrics.flush()
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4, 5, 6]
    assert [r["nodes"] for r in _lines(f"{bucket}/s1/{ATTEMPTS}")] == [["node-a", "node-b"]]
    Metrics("s1", 0, path, 6, 10**6, 10**6).log_start(["node-c"], resumed_step=None)  # from scratch again
    assert [r["resumed_step"] for r in _lines(f"{bucket}/s1/{ATTEMPTS}")] == [3, None]


def test_other_ranks_write_nothing(bucket):
    path = f"{bucket}/s1/metrics.jsonl"
    metrics = Metrics("s1", 1, path, 2, 10**6, 10**6)
    metrics.log_start(["a", "b"], None)
    metrics.step(TrainState(stage="s1", step=1), 1.0, 1, 1, 0.1, 1.0)
    metrics.flush()
    assert storage.read_text(path) is None and storage.read_text(f"{bucket}/s1/{ATTEMPTS}") is None
    assert metrics.last["step"] == 1  # every rank still knows the step's metrics (its report)


def test_model_folder_upload_listing_and_globbing(bucket, tmp_path):
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "ipn.safetensors").write_bytes(b"w1")
    (local / "sub" / "x.json").write_text("{}")
    target = f"{bucket}/s1/model"
    storage.write_bytes(f"{target}/stale.bin", b"old")
    storage.upload_dir(str(local), target)
    assert storage.read_text(f"{target}/sub/x.json") == "{}" and storage.read_text(f"{target}/stale.bin") is None
    before = storage.listing(target)
    assert list(before) == ["ipn.safetensors"] and before["ipn.safetensors"][0] == 2
    assert storage.listing(f"{bucket}/nothing") is None
    assert storage.is_dir(target) and not storage.is_dir(f"{bucket}/nothing")
    found = storage.glob(f"{bucket}/s*/model")  # with its protocol, as given (memory:// writes a third slash)
    assert len(found) == 1 and found[0].startswith("memory://") and storage.is_dir(found[0])
    assert found[0].endswith("lingcloud-test-run/s1/model")
    storage.remove(f"{bucket}/s1")
    assert not storage.is_dir(target)
    assert storage.read_json(f"{bucket}/none.json") is None


def test_ray_train_gets_a_local_folder_as_it_is_and_anything_else_through_fsspec(bucket, tmp_path):
    from pyarrow.fs import PyFileSystem

    path, fs = storage.ray_storage(str(tmp_path / "out"))
    assert path == os.path.abspath(tmp_path / "out") and fs is None
    path, fs = storage.ray_storage(f"{bucket}/out")
    assert path == "/lingcloud-test-run/out" and isinstance(fs, PyFileSystem)
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/marker") as f:  # as Ray Train writes its files
        f.write(b"x")
    assert storage.read_text(f"{bucket}/out/marker") == "x"
