"""Batch prediction on Ray Data with the stand-in IPN: one row per asked sample, features joined by
uid, failures as rows, resume after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lingcloud_testing import committed_manifest
from lmeye.cli import main
from lmeye.serve.testing import fake_answer, write_fake_checkpoint
from lmeye.tables import TableWriter
from lmeye.uid import uid_for
from schemas.features import FEATURES, SUCCESS, features_schema
from schemas.instructions import INSTRUCTIONS, shard_name

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def build_tables(root: Path, images: int = 6, shards: int = 2, dim: int = 4, patch: tuple[int, int] = (2, 3)) -> dict:
    """A features table (dim-wide embeddings, patch tokens) and an instructions table whose rows are
    one question per image per split, plus one row whose image has no features and one too long."""
    uids = [uid_for(f"http://127.0.0.1/images/{i}.png") for i in range(images)]
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((images, dim)).astype(np.float32)
    tokens = rng.standard_normal((images, patch[0] * patch[1])).astype(np.float32)
    schema = features_schema(dim, "float32", patch)
    features = pa.Table.from_pydict(
        {"uid": uids, "status": [SUCCESS] * images, "error_message": [None] * images,
         "embedding": list(emb), "patch_tokens": list(tokens)}, schema=schema)
    w = TableWriter(str(root / "features"), FEATURES, config={"fixture": "features"})
    w.write("00000.parquet", features)
    w.finalize(["00000.parquet"], stats={})
    rows = []
    for i, uid in enumerate(uids):
        for split in ("train", "validation"):
            rows.append({"sample_id": f"{i:04d}{split[0]}".ljust(16, "0"), "uid": uid, "source": "t", "task": "vqa",
                         "split": split, "conversation": [
                             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": f"it is {i}"}]})
    rows.append({"sample_id": "missing000000000", "uid": uid_for("http://127.0.0.1/none.png"), "source": "t", "task": "vqa",
                 "split": "validation", "conversation": [{"role": "user", "content": "where?"}, {"role": "assistant", "content": "x"}]})
    rows.append({"sample_id": "toolong000000000", "uid": uids[0], "source": "t", "task": "vqa", "split": "validation",
                 "conversation": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "y"}]})
    table = pa.Table.from_pylist(rows, schema=INSTRUCTIONS.with_metadata(INSTRUCTIONS.schema))
    w = TableWriter(str(root / "instructions"), INSTRUCTIONS, config={"fixture": "instructions"})
    names, per = [], -(-table.num_rows // shards)
    for k in range(shards):
        names.append(shard_name("validation", k, shards))
        w.write(names[-1], table.slice(k * per, per))
    w.finalize(names, stats={})
    ckpt = write_fake_checkpoint(str(root / "checkpoint"))
    return {"uids": uids, "emb": emb, "tokens": tokens.reshape(images, *patch), "rows": rows, "checkpoint": ckpt}


def _read(path: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(path.glob("*.parquet")))


def test_predictions_one_row_per_sample_with_features_joined(tmp_path, ray_local, capsys):
    t = build_tables(tmp_path)
    args = ["predict", str(tmp_path / "instructions"), str(tmp_path / "predictions"), "--checkpoint", t["checkpoint"],
            "--set", f"predict.features={tmp_path / 'features'}", "--set", "predict.batch_size=3",
            "--set", "predict.actor_num_cpus=0.5", "--set", "predict.max_new_tokens=200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "missing_features: 1" in out and "too_long: 1" in out
    got = {r["sample_id"]: r for r in _read(tmp_path / "predictions").to_pylist()}
    want = [r for r in t["rows"] if r["split"] == "validation"]
    assert sorted(got) == sorted(r["sample_id"] for r in want)  # the validation split only, once each
    for i, uid in enumerate(t["uids"]):
        row = got[f"{i:04d}v".ljust(16, "0")]
        assert row["uid"] == uid and row["prompt"] == f"what is {i}?" and row["reference"] == f"it is {i}"
        assert row["status"] == "success" and row["answer"] == fake_answer(f"what is {i}?", t["emb"][i])
    assert got["missing000000000"]["status"] == "missing_features" and got["missing000000000"]["answer"] is None
    assert got["toolong000000000"]["status"] == "too_long" and got["toolong000000000"]["answer"] is None
    assert main(args) == 0  # a rerun finds everything done
    assert "shards written 0, already done 2" in capsys.readouterr().out


def test_predictions_of_the_real_ipn_equal_its_chat_answers(tmp_path, ray_local):
    import torch

    from lmeye.model import build_ipn
    from lmeye.model.demo import build_tiny_llm
    from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_model_config, tiny_tokenizer

    t = build_tables(tmp_path, images=3, shards=1, dim=FEATURE_DIM, patch=PATCH_SHAPE)
    llm = build_tiny_llm(str(tmp_path / "llm"), "llama", tiny_tokenizer())
    ipn = build_ipn(tiny_model_config(llm, tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))), FEATURE_DIM, PATCH_SHAPE)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero transmission: answers depend on the image
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    ipn.save_pretrained(str(tmp_path / "ipn"))
    ipn.eval()
    assert main(["predict", str(tmp_path / "instructions"), str(tmp_path / "predictions"), "--checkpoint", str(tmp_path / "ipn"),
                 "--set", f"predict.features={tmp_path / 'features'}", "--set", "predict.max_new_tokens=8",
                 "--set", "predict.actor_num_cpus=0.5", "--set", "predict.batch_size=4"]) == 0
    got = {r["sample_id"]: r for r in _read(tmp_path / "predictions").to_pylist()}
    for i in range(3):  # batched, left-padded generation gives each row what it gets alone
        row = got[f"{i:04d}v".ljust(16, "0")]
        ctx = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"what is {i}?"}]
        assert row["answer"] == ipn.chat(ctx, t["emb"][i], t["tokens"][i], max_new_tokens=8).strip()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    build_tables(tmp_path, images=1, shards=1)
    assert main(["predict", str(tmp_path / "instructions"), "--checkpoint", str(tmp_path / "nope"),
                 "--set", f"predict.features={tmp_path / 'features'}"]) == 2
    assert f"{tmp_path / 'nope'}: checkpoint folder not found" in capsys.readouterr().err


def _job(cfg_path: Path, log: Path, *sets: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, str(REPO / "jobs" / "predict.py"), "--config", str(cfg_path),
           "--set", "ray.address=local", *(a for s in sets for a in ("--set", s))]
    with open(log, "w") as out:  # a file, not a pipe: Ray's progress lines would fill a pipe and block
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_resume_after_sigkill_redoes_only_unfinished_shards(tmp_path):
    t = build_tables(tmp_path, images=5, shards=6)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"data:\n  root: {tmp_path}\npredict:\n  checkpoint: {t['checkpoint']}\n  input: {tmp_path / 'instructions'}\n"
        f"  features: {tmp_path / 'features'}\n  split: null\n  batch_size: 1\n  actor_num_cpus: 0.5\n"
    )
    out = tmp_path / "predictions"
    manifest = out / "_manifest.json"
    log = tmp_path / "run1.log"
    proc = _job(cfg_path, log, "predict.debug_delay_s=0.5")
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if committed_manifest(manifest.parent).get("shards"):
                    break
            except ValueError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        else:
            pytest.fail("no shard finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = committed_manifest(manifest.parent)
    assert not first["complete"] and 1 <= len(first["shards"]) < 6
    kept = {n: ((out / n).stat().st_mtime_ns, hashlib.sha256((out / n).read_bytes()).hexdigest()) for n in first["shards"]}
    log = tmp_path / "run2.log"
    proc = _job(cfg_path, log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    assert f"already done {len(kept)}" in log.read_text()
    for n, (mtime, sha) in kept.items():
        assert ((out / n).stat().st_mtime_ns, hashlib.sha256((out / n).read_bytes()).hexdigest()) == (mtime, sha)
    ids = _read(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted(r["sample_id"] for r in t["rows"])  # exactly one row per sample
    assert committed_manifest(manifest.parent)["complete"] and not list(out.glob(".*.tmp-*"))
