"""The learning check: the demo pipeline on 3,000 one-shape images, then stage 1 alone and stage
1 + 2 on the held-out questions (configs/train_learning_check.yaml; README, "The learning check").
About 3 minutes alone on 2 cores; `make test` runs it (conftest's LONGEST_FIRST starts it early)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmeye.config import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
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
