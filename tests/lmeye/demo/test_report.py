"""The demo report: PNG plots, Markdown that shows them and the numbers, and the one-screen summary."""

from __future__ import annotations

import json

import pytest

from lmeye.demo.corpus import generate_items, render
from lmeye.demo.curation_check import FilterScore
from lmeye.demo.report import (
    ACCURACY_PNG,
    GALLERY_PNG,
    LOSS_PNG,
    ROWS_PNG,
    SCORES_PNG,
    GalleryEntry,
    ReportInputs,
    final_summary,
    render_markdown,
    write_report,
)
from lmeye.errors import UserError
from lmeye.eval.mmbench import passes, read_mmbench, score_mmbench
from lmeye.eval.mme import MMEAnswer, score_mme
from lmeye.eval.seedbench import SeedAnswer, score_seedbench
from lmeye.report import StageSummary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(path, losses):
    lines = [json.dumps({"step": i, "loss": loss, "lr": 1e-3}) for i, loss in enumerate(losses)]
    lines.insert(1, json.dumps({"step": 1, "eval": "skipped: no loss"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _inputs(tmp_path) -> ReportInputs:
    mme = score_mme([MMEAnswer("count", "a.jpg", "q1", "Yes", "yes"), MMEAnswer("count", "a.jpg", "q2", "No", "maybe")])
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\tcategory\tl2-category\timage\n1\tQ\tx\ty\tA\tcount\tcoarse\tAAAA\n")
    mmb = score_mmbench(zip(passes(read_mmbench(tsv)), ["A", "B"]))
    seed = score_seedbench([SeedAnswer("1", 5, "A", (0.0, -1.0, -1.0, -1.0)), SeedAnswer("2", 5, "B", (0.0, -1.0, -1.0, -1.0))])
    return ReportInputs(
        metrics={"stage 1": _metrics(tmp_path / "s1.jsonl", [4.0, 3.0, 2.5]), "stage 2": _metrics(tmp_path / "s2.jsonl", [3.5, 1.25])},
        summaries=[
            StageSummary("download", "pairs", rows=68, failures={"404": 1, "not_an_image": 1}),
            StageSummary("extract", "features", rows=64),
        ],
        accuracy={"stage 1": {"count": 0.25, "colour": 0.5}, "stage 1 + 2": {"count": 0.75, "colour": 0.875}},
        scores={"mme": mme, "mmbench": mmb, "seedbench": seed},
        checks={"learning check": "passed (stage 2 loss fell 64%)"},
        wall_seconds=321.5,
        gallery=[GalleryEntry(render(item, 48), f"What shape is it {i}?", "circle", "circle" if i else "star", bool(i))
                 for i, item in enumerate(generate_items(3, seed=0))],
    )


def test_report_writes_pngs_and_markdown_with_the_numbers(tmp_path):
    md_path = write_report(tmp_path / "report", _inputs(tmp_path))
    md = md_path.read_text()
    for name in (LOSS_PNG, ROWS_PNG, ACCURACY_PNG, SCORES_PNG, GALLERY_PNG):
        png = md_path.parent / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
        assert f"]({name})" in md
    assert "2 of 3 answered right." in md and "| What shape is it 0? | circle | star | WRONG |" in md
    assert "| download | pairs | 68 | 2 | ok |" in md and "| download | 404 | 1 |" in md
    assert "stage 1: loss 4.0000 -> 2.5000 over 3 steps" in md and "stage 2: loss 3.5000 -> 1.2500 over 2 steps" in md
    assert "learning check: passed" in md
    assert "| count | 25.00 | 75.00 |" in md and "| colour | 50.00 | 87.50 |" in md
    # MME count: acc 0.5, acc+ 0 -> 50; MMBench: 1 of 1 question; SEED: 1 of 2.
    assert "| MME | perception (sum of subtask scores) | 50.00 |" in md
    assert "| MMBench | CircularEval overall | 100.00% |" in md
    assert "| SEED-Bench | overall (likelihood ranking) | 50.00% |" in md
    assert "Wall time: 321.5 s" in md


def test_final_summary_fits_one_screen(tmp_path):
    text = final_summary(_inputs(tmp_path), report_path="out/report/report.md")
    lines = text.splitlines()
    assert len(lines) <= 25 and max(map(len, lines)) <= 100
    assert "download" in text and "404" in text and "stage 2: loss 3.5000 -> 1.2500" in text
    assert "MME perception 50.00" in text and "MMBench CircularEval 100.00%" in text and "SEED-Bench 50.00% (1/2;" in text
    assert "report: out/report/report.md" in text and "(321.5 s)" in text


def test_report_without_inputs_says_what_is_missing(tmp_path):
    md = write_report(tmp_path / "r", ReportInputs()).read_text()
    assert "No stage summaries." in md and "Not evaluated." in md and ".png" not in md


def test_bad_metrics_file_names_path_and_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 0, "loss": 1.0}\n{oops\n')
    with pytest.raises(UserError, match=r"m\.jsonl:2: not JSON"):
        write_report(tmp_path / "r", ReportInputs(metrics={"stage 1": bad}))
    with pytest.raises(UserError, match="metrics file not found"):
        write_report(tmp_path / "r", ReportInputs(metrics={"stage 1": tmp_path / "none.jsonl"}))


def test_report_scores_each_curate_filter_against_the_planted_truth(tmp_path):
    inputs = _inputs(tmp_path)
    inputs.curation = [
        FilterScore("duplicate", removed=79, planted=80, found=79, precision=1.0, recall=79 / 80,
                    by_how={"exact": (40, 40), "cropped 1 px": (9, 10)}),
        FilterScore("clip_score", removed=0, planted=40, found=0, precision=None, recall=0.0, by_how={"mismatched_caption": (0, 40)}),
    ]
    inputs.curation_note = "clip_score is off in the demo"
    md = write_report(tmp_path / "report", inputs).read_text()
    assert "## Curation against the planted cases" in md
    assert "| duplicate | 79 | 80 | 79 | 1.000 | 0.988 | exact 40/40, cropped 1 px 9/10 |" in md
    assert "| clip_score | 0 | 40 | 0 | - | 0.000 | mismatched_caption 0/40 |" in md
    assert "clip_score is off in the demo" in md
    assert "Not curated." in render_markdown(ReportInputs(), {}, {})
