"""benchmarks/train_gpu.sh at its tiny size on the CPU, as a bare GPU machine would run it: with
Ray, DeepSpeed, open_clip and pydantic unimportable (that machine has torch and transformers only).
It must print its figures, and they must add up, so the GPU benchmark cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABSENT = ("ray", "deepspeed", "open_clip", "pydantic")  # not installed on the bare GPU machine


def test_train_gpu_runs_with_torch_and_transformers_alone(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ABSENT:  # shadow the installed packages: importing one fails as on that machine
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on a bare GPU machine')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(blocked), PY=sys.executable, OMP_NUM_THREADS="1")
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "train_gpu.sh"), "--size", "tiny", "--device", "cpu", "--steps", "3",
         "--warmup", "1", "--micro-batch", "2", "--peak-tflops", "1", "--work", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("samples/s"))
    assert re.search(r"samples/s [\d.]+  tokens/s \d+  MFU [\d.]+% .* peak process memory .* [\d.]+ GiB", line), line
    r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert r["steps"] == 3 and r["micro_batch"] == 2 and r["seconds"] > 0
    assert abs(r["samples_per_s"] - 6 / r["seconds"]) < 1e-6 * r["samples_per_s"]
    # every token the LLM processes: each sample has its <img>, <img-q> and 5 <img-d> slots plus the
    # tiny size's 12-word prompt and 6-word answer, so well over 20 tokens a sample
    assert r["tokens_per_s"] / r["samples_per_s"] > 20
    assert 0 < r["mfu"] < 1 and abs(r["mfu"] - r["tflops"] / r["peak_tflops"]) < 1e-9
    assert r["peak_memory_gib"] > 0 and r["loss_first"] == r["loss_first"]  # not NaN
    assert (tmp_path / "work" / "llm" / "config.json").is_file()  # the LLM was saved and loaded back


def test_the_benchmarks_ipn_settings_are_model_config_keys():
    import importlib.util

    from lmeye.config.model import ModelConfig

    spec = importlib.util.spec_from_file_location("train_gpu", REPO / "benchmarks" / "train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ModelConfig(**module.IPN_SETTINGS)  # an unknown or mistyped key is an error
    assert set(module.IPN_SETTINGS) >= {"rvii", "num_img", "num_img_d", "rvii_image_tokens", "transmission", "max_length"}
    # every ModelConfig key the model code reads is there too: a new model option missing from the namespace
    # stops the benchmark with an AttributeError on the bare GPU machine (as rvii_image_position once did)
    import re

    read = set()
    for name in ("ipn.py", "rvii.py", "seq2seq.py"):
        read |= set(re.findall(r"\bcfg\.(\w+)", (REPO / "lmeye" / "model" / name).read_text()))
    assert read & set(ModelConfig.model_fields) <= set(module.IPN_SETTINGS) | {"llm", "tokenizer", "clip_model", "clip_pretrained", "dtype", "attn_implementation"}
