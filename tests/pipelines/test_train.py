"""The train stage: DeepSpeed ZeRO-2 on 2 Ray Train workers with the fake IPN (tests/lmeye/train/fake_ipn.py).

Every row of the epoch is trained exactly once between the workers, their trainable weights agree
after every step, a SIGKILLed run resumed with ``resume: latest`` trains each remaining row once and
ends with the weights of an uninterrupted run, and bad input fails before any worker starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmeye.cli import main
from lmeye.config import load_config
from lmeye.errors import UserError
from lmeye.train.data import hex64

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "lmeye" / "train" / "run_fake.py"
N_TRAIN = 80
ACCUM = 2


def _fake():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fake_ipn_file", REPO / "tests" / "lmeye" / "train" / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def _overrides(tables: dict, output: Path, **extra) -> dict:
    base = {
        "ray.address": "local", "ray.num_cpus": 2,
        "train.instructions": str(tables["instructions"]), "train.features": str(tables["features"]),
        "train.output": str(output), "train.num_workers": 2, "train.cpus_per_worker": 0.5,
        "train.zero_stage": 2, "train.precision": "fp32", "train.micro_batch_size": 4, "train.grad_accum": ACCUM,
        "train.checkpoint_every": 2, "train.keep_checkpoints": 10, "train.log_every": 1, "train.shuffle_buffer": 8, "train.lr": 0.05,
        "train.warmup_steps": 1, "train.stages": [{"name": "s1", "trainable": "instruct", "train_visual_mapping": True}],
    }
    base.update(extra)
    return base


def _start(tmp: Path, name: str, overrides: dict, log_dir: Path, delay_s: float = 0.0) -> tuple[subprocess.Popen, Path]:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"overrides": overrides, "log_dir": str(log_dir), "delay_s": delay_s}))
    log = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "w") as out:  # a file, not a pipe: Ray's output would fill a pipe and block
        proc = subprocess.Popen([sys.executable, str(RUNNER), str(spec)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "ipn.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tables, and one uninterrupted run of stage s1 (2 workers, ZeRO-2, fp32)."""
    fake = _fake()
    root = tmp_path_factory.mktemp("train")
    tables = fake.build_tables(root, n_train=N_TRAIN)
    proc, log = _start(root, "reference", _overrides(tables, root / "out"), root / "log")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return {"root": root, "tables": tables, "out": root / "out" / "s1", "log": log, "logs": fake.read_log(str(root / "log")),
            "fake": fake}


@pytest.mark.slow
def test_two_zero2_workers_train_every_row_once_with_identical_weights(reference):
    logs, tables = reference["logs"], reference["tables"]
    assert sorted(logs) == [0, 1] and all(logs.values())
    keys = [k for rank in logs.values() for rec in rank for k in rec["keys"]]
    assert sorted(keys) == sorted(tables["trainable"])  # every trainable row once, between the two ranks
    shared = min(len(logs[0]), len(logs[1]))
    assert shared >= 4
    for a, b in zip(logs[0][:shared], logs[1][:shared]):
        assert a["weights"] == b["weights"]  # the ranks hold the same weights at every micro-step
    assert len({rec["weights"] for rec in logs[0]}) > 1  # and they do train
    out = reference["log"].read_text()
    assert "== train s1 finished" in out and re.search(r"\d+\s+skipped: missing_features", out)
    summary = json.loads((reference["out"] / "summary.json").read_text())
    assert json.loads(summary["metrics"]["skipped"]) == {"missing_features": 2, "too_long": 2}
    assert summary["metrics"]["rows"] == len(tables["trainable"]) and "val_loss" in summary["metrics"]
    steps = [json.loads(line) for line in (reference["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, summary["metrics"]["step"] + 1))
    assert all(s["lr"] > 0 and s["samples_per_s"] > 0 and s["tokens_per_s"] > 0 for s in steps[:-1])
    assert (reference["out"] / "loss.png").stat().st_size > 0
    assert (reference["out"] / "model" / "ipn_config.json").exists()


def _kill_then_resume(tmp_path: Path, tables: dict, fake, **extra) -> tuple[list, list, Path]:
    """Run stage s1, SIGKILL it mid-epoch after a checkpoint, resume it: (rows trained before the kill's
    checkpoint, rows trained after the resume, the output folder)."""
    out = tmp_path / "out"
    proc, log = _start(tmp_path, "killed", _overrides(tables, out, **extra), tmp_path / "log1", delay_s=1.0)
    try:
        deadline = time.time() + 300
        ckpt = None
        while time.time() < deadline and ckpt is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            done = [p for p in _checkpoints(out / "s1") if (p / "state.json").exists() and (p / "seen" / "rank1.npy").exists()]
            ckpt = done[0] if done else None
            time.sleep(0.05)
        assert ckpt is not None, "no checkpoint in time"
        first_step = json.loads((ckpt / "state.json").read_text())["step"]
        # let the run go on past the checkpoint (so Ray Train has recorded it), then kill it mid-epoch
        while len(fake.read_log(str(tmp_path / "log1")).get(0, [])) <= first_step * ACCUM + 1:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "s1" / "summary.json").exists()
    proc, log2 = _start(tmp_path, "resumed", _overrides(tables, out, **extra), tmp_path / "log2")
    assert proc.wait(timeout=600) == 0, log2.read_text()[-3000:]
    resumed = re.search(r"resumed at epoch 0 step (\d+)", log2.read_text())
    assert resumed, log2.read_text()[-3000:]
    step = int(resumed.group(1))
    ckpt = next(p for p in _checkpoints(out / "s1") if json.loads((p / "state.json").read_text())["step"] == step)
    seen = set(np.concatenate([np.load(p) for p in (ckpt / "seen").glob("rank*.npy")]).tolist())
    # which rows the checkpoint had trained: every seen row that is trainable
    by_key = {r["conversation"][0]["content"]: r["sample_id"] for r in tables["rows"]}
    before = [k for k in tables["trainable"] if hex64([by_key[k]])[0][0] in seen]
    after = [k for rank in fake.read_log(str(tmp_path / "log2")).values() for rec in rank for k in rec["keys"]]
    return before, after, out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_latest_trains_the_rest_once_and_matches(reference, tmp_path):
    tables, trainable = reference["tables"], reference["tables"]["trainable"]
    before, after, out = _kill_then_resume(tmp_path, tables, reference["fake"])
    assert 0 < len(before) < len(trainable)  # killed mid-epoch
    assert len(after) == len(set(after)) and not set(after) & set(before)  # none twice
    assert sorted(before + after) == sorted(trainable)  # none skipped
    want, got = _weights(reference["out"] / "model"), _weights(out / "s1" / "model")
    assert want.keys() == got.keys()
    assert max(float(np.abs(want[k] - got[k]).max()) for k in want) <= 1e-4
    # one metrics line a step: the resumed run dropped the killed run's lines past its checkpoint
    steps = [json.loads(line)["step"] for line in (out / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, json.loads((out / "s1" / "summary.json").read_text())["metrics"]["step"] + 1))


@pytest.mark.slow
def test_grouped_by_length_a_killed_run_resumes_and_trains_each_remaining_row_once(reference, tmp_path):
    """train.group_by_length draws several micro-batches' rows at once: rows drawn but not trained when the
    checkpoint was written are not in its seen set, so the resumed run trains them, and no row twice (its
    batches differ from an uninterrupted run's, so its weights are not compared)."""
    tables, trainable = reference["tables"], reference["tables"]["trainable"]
    before, after, _ = _kill_then_resume(tmp_path, tables, reference["fake"], **{"train.group_by_length": 3})
    assert 0 < len(before) < len(trainable)
    assert len(after) == len(set(after)) and not set(after) & set(before)
    assert sorted(before + after) == sorted(trainable)


@pytest.mark.slow
def test_rerun_changing_what_does_not_train_is_done_and_another_worker_count_stops_in_one_line(reference, monkeypatch):
    from pipelines.train import run

    tables, fake, stage = reference["tables"], reference["fake"], reference["out"]
    _no_ray(monkeypatch)
    same = {"train.checkpoint_every": 7, "train.keep_checkpoints": 3, "train.log_every": 5, "train.val_max_rows": 3,
            "train.cpus_per_worker": 0.25}
    summary = run(load_config(None, _overrides(tables, stage.parent, **same)), factory=fake.FakeFactory())
    assert summary.ok and "nothing redone" in summary.notes[0]
    before = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    with pytest.raises(UserError, match=r"num_workers 2, not 1, .*set train.num_workers: 2 to resume, or train a new "
                                        r"stage with init_from: \S+/model \(the last saved model\)$"):
        run(load_config(None, _overrides(tables, stage.parent, **{"train.num_workers": 1})), factory=fake.FakeFactory())
    assert sorted(str(p.relative_to(stage)) for p in stage.rglob("*")) == before  # nothing deleted


def _no_ray(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Ray was started before the input checks")

    monkeypatch.setattr("lmeye.runtime.init_ray", boom)


def test_bad_inputs_fail_with_one_error_before_any_worker(tmp_path, monkeypatch):
    from pipelines.train import run

    fake = _fake()
    tables = fake.build_tables(tmp_path, n_train=8, n_val=2)
    _no_ray(monkeypatch)

    def cfg(**extra):
        return load_config(None, _overrides(tables, tmp_path / "out", **extra))

    with pytest.raises(FileNotFoundError, match="no instructions table at .*nowhere"):
        run(cfg(**{"train.instructions": str(tmp_path / "nowhere")}), factory=fake.FakeFactory())
    with pytest.raises(FileNotFoundError, match="no features table at .*nowhere"):
        run(cfg(**{"train.features": str(tmp_path / "nowhere")}), factory=fake.FakeFactory())
    with pytest.raises(UserError, match="model.llm"):
        run(cfg(), factory=fake.FakeFactory(llm_ok=False))
    two = [{"name": "a", "trainable": "align"}, {"name": "b", "trainable": "instruct", "init_from": "a"}]
    with pytest.raises(FileNotFoundError, match="train stage a first"):
        run(cfg(**{"train.stages": two, "train.only": ["b"]}), factory=fake.FakeFactory())
    with pytest.raises(FileNotFoundError, match="neither an earlier stage"):
        run(cfg(**{"train.stages": [{"name": "b", "trainable": "instruct", "init_from": str(tmp_path / "x")}]}),
            factory=fake.FakeFactory())
    wide = tmp_path / "wide"
    fake.FakeIPN(16, None).save_pretrained(str(wide))  # a model for 16-d features; the table has 8-d
    with pytest.raises(UserError, match="16-d features, but .* holds 8-d"):
        run(cfg(**{"train.stages": [{"name": "b", "trainable": "instruct", "init_from": str(wide)}]}),
            factory=fake.FakeFactory())
    with pytest.raises(UserError, match="no train rows of tasks"):
        run(cfg(**{"train.stages": [{"name": "a", "trainable": "align", "tasks": ["nope"]}]}), factory=fake.FakeFactory())


def test_cli_reports_a_missing_table_in_one_line(tmp_path, monkeypatch, capsys):
    _no_ray(monkeypatch)
    assert main(["train", "--set", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no instructions table" in err[0] and "lmeye instruct" in err[0]


@pytest.mark.slow
def test_both_stages_write_to_a_bucket_and_the_second_starts_from_the_firsts_weights(tmp_path, monkeypatch):
    """``train.output`` on S3 (moto's server on 127.0.0.1): `align` then `instruct` with `init_from:
    align`, 2 workers. Every file of both stages is an object in the bucket (metrics.jsonl and
    attempts.jsonl written by rank 0 in its own worker process, checkpoints uploaded by Ray Train through
    fsspec), nothing lands in a local folder named `s3:`, and stage 2 read stage 1's model from the bucket:
    its visual mapping, frozen there, is stage 1's trained one, not a fresh one."""
    from lingcloud_testing import moto_s3
    from safetensors.numpy import load as load_weights

    fake = _fake()
    tables = fake.build_tables(tmp_path, n_train=24, n_val=4)
    stages = [{"name": "align", "trainable": "align"},
              {"name": "instruct", "trainable": "instruct", "init_from": "align", "train_visual_mapping": False}]
    output = "s3://lingcloud-train/runs/out"
    with moto_s3("lingcloud-train") as s3:
        proc, log = _start(tmp_path, "s3", _overrides(tables, Path(output), **{
            "train.output": output, "train.stages": stages, "train.shuffle_buffer": 0, "train.keep_checkpoints": 2}),
            tmp_path / "log")
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        s3.invalidate_cache()
        keys = {k.removeprefix("lingcloud-train/runs/out/") for k in s3.find("lingcloud-train/runs/out")}

        def blob(key: str) -> bytes:
            return s3.cat_file(f"lingcloud-train/runs/out/{key}")

        for stage in ("align", "instruct"):
            for name in ("run.json", "summary.json", "metrics.jsonl", "attempts.jsonl", "loss.png",
                         "model/ipn.safetensors", "model/ipn_config.json"):
                assert f"{stage}/{name}" in keys, (stage, name, sorted(keys))
            ckpts = {k.split("/")[1] for k in keys if k.startswith(f"{stage}/checkpoint_") and k.endswith("/state.json")}
            assert 1 <= len(ckpts) <= 2  # Ray Train's checkpoints, keep_checkpoints of them
            for ckpt in ckpts:  # every rank's part (DeepSpeed's state uploaded from each worker's local folder)
                assert {f"{stage}/{ckpt}/seen/rank{r}.npy" for r in (0, 1)} <= keys
                assert any(k.startswith(f"{stage}/{ckpt}/deepspeed/") for k in keys)
            summary = json.loads(blob(f"{stage}/summary.json"))
            steps = [json.loads(line)["step"] for line in blob(f"{stage}/metrics.jsonl").decode().splitlines()]
            assert steps == list(range(1, summary["metrics"]["step"] + 1))  # rank 0's, every step once
            starts = [json.loads(line) for line in blob(f"{stage}/attempts.jsonl").decode().splitlines()]
            assert len(starts) == 1 and len(starts[0]["nodes"]) == 2 and starts[0]["resumed_step"] is None
        first = load_weights(blob("align/model/ipn.safetensors"))
        second = load_weights(blob("instruct/model/ipn.safetensors"))
    import torch

    torch.manual_seed(load_config(None, {}).train.seed)  # what FakeFactory.build starts from
    fresh = fake.FakeIPN(8, (4, 6)).trainable_state_dict()
    visual = [k for k in first if k.startswith("visual.")]
    assert visual and all(np.array_equal(second[k], first[k]) for k in visual)  # loaded from the bucket
    assert any(not np.allclose(first[k], fresh[k].numpy()) for k in visual)  # and trained in stage 1
    assert any(not np.allclose(second[k], fresh[k].numpy()) for k in second if k.startswith("request."))  # stage 2 trained
    assert not (REPO / "s3:").exists() and not (tmp_path / "s3:").exists()
