"""ZeRO-3 end to end with the real IPN (tiny LLaMA, tiny CLIP text tower) on 2 gloo workers.

Every parameter is partitioned (``stage3_param_persistence_threshold: 0``), so each place that reads
a weight outside its module's forward sees shape [0], as a 7B run's large weights do: RVII's text
projection, the model directory (weights frozen in the stage), validation's ``generate`` (the IPN's
own embeddings, and ranks whose shards differ in size). Two stages, the second ``init_from`` the
first; the trained weights of both equal a ZeRO-2 run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lmeye.model")

from lmeye.config import load_config  # noqa: E402
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _tables(root: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fake_ipn_file", REPO / "tests" / "lmeye" / "train" / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # 13 train rows with one text-only row and one without features; 5 validation rows: shards of 3 and 2
    return module.build_tables(root, n_train=13, n_val=5, missing=(4,), too_long=(), text_only=(6,),
                               dim=FEATURE_DIM, patch=PATCH_SHAPE)


def _run(root: Path, tables: dict, llm: str, clip: str, zero: int) -> Path:
    from pipelines.train import run

    out = root / f"zero{zero}"
    cfg = load_config(None, {
        "ray.address": "local", "ray.num_cpus": 2, "data.root": str(root),
        "model.llm": llm, "model.clip_model": "lingcloud-tiny-vit", "model.clip_pretrained": clip, "model.max_length": 64,
        "train.instructions": str(tables["instructions"]), "train.features": str(tables["features"]),
        "train.output": str(out), "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.resume": "never",
        "train.zero_stage": zero, "train.zero3_param_persistence_threshold": 0, "train.precision": "fp32",
        "train.micro_batch_size": 2, "train.grad_accum": 1, "train.shuffle_buffer": 0, "train.lr": 0.01,
        "train.warmup_steps": 0, "train.schedule": "constant", "train.checkpoint_every": 100, "train.log_every": 100,
        "train.val_max_new_tokens": 3,
        "train.stages": [{"name": "align", "trainable": "align"},
                         {"name": "instruct", "trainable": "instruct", "init_from": "align", "train_visual_mapping": True}],
    })
    summary = run(cfg)
    assert summary.ok
    return out


def _weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "ipn.safetensors"))


@pytest.mark.slow
def test_zero3_with_every_parameter_partitioned_trains_saves_loads_and_validates_as_zero2(tmp_path, ray_local):
    from lmeye.model.demo import build_tiny_llm

    llm = build_tiny_llm(str(tmp_path / "llm"), "llama", tiny_tokenizer())
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    tables = _tables(tmp_path)
    zero2 = _run(tmp_path, tables, llm, clip, 2)
    zero3 = _run(tmp_path, tables, llm, clip, 3)
    for stage in ("align", "instruct"):
        a, b = _weights(zero2 / stage / "model"), _weights(zero3 / stage / "model")
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].shape == b[name].shape and a[name].size > 0, name  # every weight whole, none [0]
            assert np.abs(a[name] - b[name]).max() <= 1e-4, name
        metrics = json.loads((zero3 / stage / "summary.json").read_text())["metrics"]
        assert metrics["val_rows"] == 5 and "val_loss" in metrics  # both ranks' validation, shards of 3 and 2
    trained = _weights(zero3 / "instruct" / "model")
    start = _weights(zero3 / "align" / "model")
    assert any(np.abs(trained[n] - start[n]).max() > 0 for n in trained if n.startswith("rvii"))  # stage 2 trained RVII
