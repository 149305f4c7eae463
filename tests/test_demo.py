"""The demo pipeline end to end: corpus -> loopback HTTP -> download -> extract -> instruct -> train -> evaluate."""

from __future__ import annotations

import json

import pyarrow.compute as pc
from lingcloud_testing import free_port

from lmeye.config import load_config
from lmeye.demo.run import run_demo
from lmeye.tables import Manifest, TableReader
from schemas.pairs import PAIRS, SUCCESS


def test_demo_pipeline_end_to_end(tmp_path, ray_local, capsys):
    # One port for both runs: uids come from URLs, so a rerun must serve the same ones.
    cfg = load_config("configs/demo.yaml", {
        "data.root": str(tmp_path / "demo"), "demo.num_images": 16, "demo.port": free_port(),
        "download.samples_per_shard": 8, "demo.eval_images": 3, "demo.llm_steps": 200,
        # the pipeline, not the model's quality, is under test: one epoch per stage, fp32 (bf16 is
        # emulated, slowly, on CPUs without AVX512-BF16), one Ray Train worker (two: tests/pipelines/test_train.py)
        "train.precision": "fp32", "train.num_workers": 1,
        "train.stages": [
            {"name": "align", "trainable": "align", "tasks": ["short_caption", "detailed_description", "grounded_qa"]},
            {"name": "instruct", "trainable": "instruct", "init_from": "align", "train_visual_mapping": True},
        ],
    })
    summaries = run_demo(cfg)
    out = capsys.readouterr().out
    got = [(s.stage, s.ok, s.notes) for s in summaries]
    assert [s.stage for s in summaries] == ["download", "extract", "instruct", "train instruct"], got
    assert all(s.ok for s in summaries), got
    for stage in ("download", "extract", "instruct", "train align", "train instruct"):
        assert f"== {stage} finished" in out
    assert "[demo] ok" in out

    # trained, evaluated, reported: both stages' models, the three benchmarks, the plots
    root = tmp_path / "demo"
    for stage in ("align", "instruct"):
        assert (root / "train" / stage / "model" / "ipn.safetensors").is_file()
        recorded = json.loads((root / "train" / stage / "model" / "ipn_config.json").read_text())["features"]
        assert recorded == str(cfg.extract.output)  # chat and eval encode images with this table's extractor
    for bench in ("mme", "mmbench", "seedbench"):
        assert (root / "eval" / f"{bench}.json").is_file(), bench
    report = (root / "report" / "report.md").read_text()
    for png in ("loss_curves.png", "row_counts.png", "accuracy_by_type.png", "benchmark_scores.png"):
        assert (root / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in report
    assert "LingCloud demo: summary" in out and "SEED-Bench" in out

    pairs = TableReader(cfg.download.output, PAIRS).read(columns=["uid", "url", "status"])
    assert pairs.num_rows == 16 + 4  # every good image and every broken entry, once
    good = set(pairs.filter(pc.equal(pairs["status"], SUCCESS))["uid"].to_pylist())
    assert len(good) == 16

    features = Manifest.load(cfg.extract.output)
    assert features is not None and features.complete and features.table == "features"

    instructions = Manifest.load(cfg.instruct.output)
    assert instructions is not None and instructions.complete and instructions.num_rows > 16

    # Rerunning the demo redoes nothing.
    again = run_demo(cfg)
    assert all(s.ok and s.shards_done == 0 for s in again[:2])
