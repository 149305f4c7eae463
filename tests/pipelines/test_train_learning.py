"""The learning check: the demo pipeline on 3,000 images, then stage 1 alone and stage 1 + 2 on the
held-out questions (configs/train_learning_check.yaml).

About 15 minutes on 2 cores, so it runs only with LINGCLOUD_LEARNING_CHECK=1. Measured 2026-11-28
(README, "The learning check"), with the pretrained demo CLIP and the context-reading demo LLM:
stage 1 + 2 reached 0.553 held-out exact match (majority 0.221, swapped 0.190, stage 1 alone 0.210).
That is short of the 0.80 asked for, because questions that need a shape's position stay at chance.
This test states the target."""

from __future__ import annotations

from pathlib import Path

import os

import pytest

from lmeye.config import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LINGCLOUD_LEARNING_CHECK") != "1",
                       reason="about 15 min on 2 cores; set LINGCLOUD_LEARNING_CHECK=1 (see the module doc)"),
]


def test_stage_1_plus_2_answers_from_the_image(tmp_path):
    pytest.importorskip("lmeye.model")
    from lmeye.train.learning_check import render, run

    cfg = load_config(REPO / "configs" / "train_learning_check.yaml", {"data.root": str(tmp_path), "ray.num_cpus": 2})
    results = run(cfg)
    for name, result in results.items():
        print(render(f"stage {name}", result))
    both, align = results["instruct"], results["align"]
    assert both["rows"] >= 500 and align["rows"] == both["rows"]
    assert both["majority"]["all"] <= 0.35
    assert both["exact_match"]["all"] >= 0.80
    assert both["swapped"]["all"] <= both["majority"]["all"] + 0.10  # the answers come from the image
    assert both["exact_match"]["all"] > align["exact_match"]["all"]  # the interactive stage adds to alignment
