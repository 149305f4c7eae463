"""benchmarks/train_memory.py at its tiny size on the CPU: it must print its two ratios from three
processes of its own, and the step with recomputed activations must reach the same loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_memory_prints_the_load_and_step_ratios(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_memory.py"), "--size", "tiny", "--seq", "0",
                          "--micro-batch", "2", "--threads", "1", "--work", str(tmp_path / "work")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(l.startswith("load: ") and "ratio" in l for l in lines)
    assert any(l.startswith("step: activations kept ") and "recomputed" in l for l in lines)
    r = json.loads(next(l for l in lines if l.startswith("RESULT "))[len("RESULT "):])
    keep, again = r["keep"], r["recompute"]
    assert (keep["variant"], again["variant"]) == ("keep", "recompute")
    assert keep["weights_bytes"] == again["weights_bytes"] > 0 and keep["load_bytes"] > 0 and keep["step_bytes"] > 0
    assert abs(r["load_ratio"] - keep["load_bytes"] / keep["weights_bytes"]) < 1e-9
    assert abs(r["step_ratio"] - again["step_bytes"] / keep["step_bytes"]) < 1e-9
    assert abs(keep["loss"] - again["loss"]) < 1e-2 and keep["tokens_per_sample"] > 20  # bf16 autocast
    assert (tmp_path / "work" / "llm" / "config.json").is_file()  # built once, by the first process
