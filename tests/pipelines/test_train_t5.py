"""The real train stage with an encoder-decoder LLM: a tiny T5 (``lmeye.model.released``) inside the
real IPN (``Seq2SeqIPN``), DeepSpeed ZeRO-2 on 2 Ray Train workers. The run is SIGKILLed once Ray
Train has recorded its first checkpoint, resumed with ``resume: latest``, and the stage's saved model
then loads and answers.

The fake-IPN tests (test_train.py) check the trainer's bookkeeping row by row; this one checks that
the encoder-decoder path goes through the same machinery: DeepSpeed's ZeRO-2 partitions and restores
the seq2seq IPN's trainable parameters, the batch maker packs its encoder inputs, and the final
checkpoint's model is a directory ``load_ipn`` rebuilds as a ``Seq2SeqIPN``.
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

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train (v2) records its checkpoints here


def _tables(root: Path) -> dict:
    """The fake-IPN tests' tables (tests/lmeye/train/fake_ipn.py), with the tiny CLIP's feature shapes."""
    import importlib.util

    from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE

    spec = importlib.util.spec_from_file_location("_fake_ipn_file", REPO / "tests" / "lmeye" / "train" / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tables(root, n_train=24, n_val=4, dim=FEATURE_DIM, patch=PATCH_SHAPE)


def _config(tmp: Path, llm: str, clip: str, tables: dict) -> Path:
    cfg = {
        "ray": {"address": "local", "num_cpus": 2},
        "model": {"llm": llm, "clip_model": "lingcloud-tiny-vit", "clip_pretrained": clip, "max_length": 64, "chat_template": "plain",
                  "num_img_d": 3, "rvii": "transformer", "rvii_width": 32, "rvii_heads": 2, "rvii_layers": 1},
        "train": {"instructions": str(tables["instructions"]), "features": str(tables["features"]),
                  "output": str(tmp / "out"), "num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2,
                  "precision": "fp32", "micro_batch_size": 4, "grad_accum": 1, "checkpoint_every": 2,
                  "keep_checkpoints": 10, "log_every": 1, "shuffle_buffer": 8, "lr": 0.01, "warmup_steps": 1,
                  "val_max_rows": 4, "val_max_new_tokens": 4,
                  "stages": [{"name": "s1", "trainable": "instruct", "train_visual_mapping": True, "epochs": 2}]},
    }
    path = tmp / "t5.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from lmeye.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(log, "w") as out:  # a file, not a pipe: Ray's output would fill a pipe and block
        return subprocess.Popen([sys.executable, "-c", code, "train", "--config", str(config)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _recorded(stage: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of the stage (so a resumed run starts from it)."""
    snapshot = stage / SNAPSHOT
    try:
        return "checkpoint_" in snapshot.read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_t5_trains_under_zero2_is_killed_resumes_and_its_model_answers(tmp_path):
    import torch

    from lmeye.model import load_ipn
    from lmeye.model.released import build_family
    from lmeye.model.seq2seq import Seq2SeqIPN
    from lmeye.model.testing import features, tiny_clip_checkpoint

    llm = build_family(str(tmp_path / "t5"), "t5")
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    config = _config(tmp_path, llm, clip, _tables(tmp_path))
    stage = tmp_path / "out" / "s1"

    proc = _start(config, tmp_path / "killed.log")
    try:
        deadline = time.time() + 300
        while not _recorded(stage):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (stage / "summary.json").exists()  # killed before the end
    killed_at = max(json.loads((p / "state.json").read_text())["step"] for p in stage.glob("checkpoint_*")
                    if (p / "state.json").exists())

    proc = _start(config, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    resumed = re.search(r"resumed at epoch \d+ step (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) <= killed_at, log[-3000:]
    summary = json.loads((stage / "summary.json").read_text())["metrics"]
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, summary["step"] + 1)) and summary["step"] > int(resumed.group(1))
    assert "val_loss" in summary and 0 <= summary["val_exact_match"] <= 1

    ipn = load_ipn(str(stage / "model"))
    assert isinstance(ipn, Seq2SeqIPN) and ipn.llm.config.is_encoder_decoder
    trained = ipn.trainable_state_dict()
    fresh = load_ipn(str(stage / "model"))  # deterministic: the same directory gives the same weights
    assert all(torch.equal(v, fresh.trainable_state_dict()[k]) for k, v in trained.items())
    emb, patches = features(1)
    ipn.eval()
    answer = ipn.chat([{"role": "user", "content": "q0 what colour"}], emb[0], patches[0], max_new_tokens=4)
    assert isinstance(answer, str) and answer == fresh.chat([{"role": "user", "content": "q0 what colour"}], emb[0],
                                                            patches[0], max_new_tokens=4)
