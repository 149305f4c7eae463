"""The demo's report: a folder with ``report.md`` and its PNG plots, plus a one-screen summary text.

Plots are drawn on ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot state), so the
report can be written from any thread or worker without a display.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmeye.errors import UserError
from lmeye.eval.common import headline, markdown_table, pct
from lmeye.report import StageSummary

LOSS_PNG = "loss_curves.png"
ROWS_PNG = "row_counts.png"
ACCURACY_PNG = "accuracy_by_type.png"
SCORES_PNG = "benchmark_scores.png"
GALLERY_PNG = "gallery.png"


@dataclass(frozen=True)
class GalleryEntry:
    """A held-out image, a question about it, the model's answer and whether it is the right one."""

    image: bytes  # the encoded image
    question: str
    answer: str
    truth: str
    right: bool


@dataclass
class ReportInputs:
    """What the demo knows at its end. Every field may be empty; its section then says so."""

    metrics: dict[str, str | Path] = field(default_factory=dict)  # training stage -> metrics JSONL (step, loss, ...)
    summaries: list[StageSummary] = field(default_factory=list)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # run ("stage 1", "stage 1 + 2") -> type -> acc
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark -> its lmeye.eval result
    checks: dict[str, str] = field(default_factory=dict)  # e.g. "learning check" -> "passed: ..."
    wall_seconds: float | None = None
    gallery: list[GalleryEntry] = field(default_factory=list)
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark -> result of stage 1 alone
    baseline_name: str = "stage 1 alone"
    curation: list = field(default_factory=list)  # lmeye.demo.curation_check.FilterScore per filter
    curation_note: str = ""  # what the demo leaves off, and why


# ---------------------------------------------------------------------------------------------
# Inputs


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The steps of a metrics JSONL that carry a loss (other records, e.g. evaluations, are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: metrics file not found")
    steps = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        if isinstance(record, dict) and "step" in record and isinstance(record.get("loss"), (int, float)):
            steps.append(record)
    return steps


def loss_summary(steps: list[dict[str, Any]]) -> str:
    if not steps:
        return "no steps"
    first, last = steps[0]["loss"], steps[-1]["loss"]
    return f"loss {first:.4f} -> {last:.4f} over {len(steps)} steps (step {steps[-1]['step']})"


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_losses(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig = _figure(5 * max(1, len(curves)), 3.6)
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (stage, steps) in zip(axes, curves.items()):
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue", linewidth=1.2)
        ax.set(title=f"{stage}: training loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def plot_rows(summaries: list[StageSummary], path: Path) -> Path:
    import numpy as np

    fig = _figure(max(5.0, 1.3 * len(summaries) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(summaries))
    rows = [s.rows for s in summaries]
    failed = [sum(s.failures.values()) for s in summaries]
    ax.bar(x - 0.2, rows, width=0.4, label="rows out", color="tab:blue")
    ax.bar(x + 0.2, failed, width=0.4, label="failures", color="tab:red")
    for xi, n in zip(x, rows):
        ax.annotate(str(n), (xi - 0.2, n), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [s.stage for s in summaries])
    ax.set(title="rows per stage", ylabel="rows")
    ax.legend()
    fig.savefig(path)
    return path


def plot_accuracy(accuracy: dict[str, dict[str, float]], path: Path) -> Path:
    import numpy as np

    types = sorted({t for acc in accuracy.values() for t in acc})
    fig = _figure(max(5.0, 1.2 * len(types) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(types))
    width = 0.8 / max(1, len(accuracy))
    for i, (run, acc) in enumerate(accuracy.items()):
        ax.bar(x + (i - (len(accuracy) - 1) / 2) * width, [100 * acc.get(t, 0.0) for t in types], width=width, label=run)
    ax.set_xticks(x, types)
    ax.set(title="accuracy per question type", ylabel="accuracy %", ylim=(0, 100))
    ax.legend()
    fig.savefig(path)
    return path


def _score_panels(scores: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, float], str]]:
    panels = []
    if "mme" in scores:
        panels.append(("MME score per subtask (max 200)", {k: v["score"] for k, v in scores["mme"]["subtasks"].items()}, "score"))
    if "mmbench" in scores:
        panels.append(("MMBench CircularEval per category", {k: 100 * v for k, v in scores["mmbench"]["category"].items()}, "accuracy %"))
    if "seedbench" in scores:
        panels.append(("SEED-Bench per dimension", {k: 100 * v["accuracy"] for k, v in scores["seedbench"]["dimensions"].items()}, "accuracy %"))
    return panels


def plot_scores(scores: dict[str, dict[str, Any]], path: Path) -> Path:
    panels = _score_panels(scores)
    fig = _figure(5 * len(panels), 3.8)
    for ax, (title, values, unit) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.bar(range(len(values)), list(values.values()), color="tab:green")
        ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel=unit, ylim=(0, 200 if unit == "score" else 100))
    fig.savefig(path)
    return path


def plot_gallery(entries: list[GalleryEntry], path: Path, columns: int = 4) -> Path:
    import io

    from PIL import Image

    rows = (len(entries) + columns - 1) // columns
    fig = _figure(2.6 * columns, 3.0 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, e in zip(axes, entries):
        ax.imshow(Image.open(io.BytesIO(e.image)).convert("RGB"))
        mark = "right" if e.right else f"wrong (truth: {e.truth})"
        ax.set_title(f"{e.question}\nLMEye: {e.answer or '(nothing)'}\n{mark}", fontsize=7,
                     color="tab:green" if e.right else "tab:red")
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------
# Text

# benchmark -> (its main score's key in the result, what it is)
MAIN_SCORE = {"mme": ("accuracy", "MME accuracy"), "mmbench": ("overall", "MMBench CircularEval"), "seedbench": ("overall", "SEED-Bench accuracy")}


def versus_lines(inputs: ReportInputs) -> list[str]:
    """Each benchmark's main score beside its chance level and beside stage 1 alone."""
    lines = []
    for name, result in inputs.scores.items():
        if name not in MAIN_SCORE or MAIN_SCORE[name][0] not in result:
            continue
        key, label = MAIN_SCORE[name]
        line = f"{label} {result[key]:.3f} (chance {result.get('chance', 0.0):.3f}"
        if key in inputs.baseline.get(name, {}):
            line += f"; {inputs.baseline_name} {inputs.baseline[name][key]:.3f}"
        lines.append(line + ")")
    return lines



def _scores_table(scores: dict[str, dict[str, Any]]) -> str:
    rows = []
    if "mme" in scores:
        r = scores["mme"]
        rows.append(("MME", "perception (sum of subtask scores)", f"{r['perception']:.2f}", f"{r['other']} of {r['questions']} answers neither yes nor no"))
        rows.append(("MME", "cognition", f"{r['cognition']:.2f}", ""))
    if "mmbench" in scores:
        r = scores["mmbench"]
        rows.append(("MMBench", "CircularEval overall", f"{pct(r['overall'])}%", f"{r['unparsed']} of {r['passes']} answers unparsed"))
    if "seedbench" in scores:
        r = scores["seedbench"]
        rows.append(("SEED-Bench", "overall (likelihood ranking)", f"{pct(r['overall'])}%", f"{r['correct']} of {r['questions']}"))
    return markdown_table(("benchmark", "score", "value", "note"), rows)


def _curation_section(inputs: ReportInputs) -> list[str]:
    if not inputs.curation:
        return ["Not curated."]
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    rows = [(c.filter, c.removed, c.planted, c.found, f(c.precision), f(c.recall),
             ", ".join(f"{how} {found}/{n}" for how, (found, n) in c.by_how.items())) for c in inputs.curation]
    out = ["Each filter's removals, scored against the truth planted in the corpus (planted.json beside it); "
           "duplicates count planted pairs (original, copy), found when either was dropped as the other's duplicate.", "",
           markdown_table(("filter", "removed", "planted", "found", "precision", "recall", "found by how it was made"), rows)]
    return out + (["", inputs.curation_note] if inputs.curation_note else [])


def render_markdown(inputs: ReportInputs, curves: dict[str, list[dict[str, Any]]], plots: dict[str, str]) -> str:
    out = ["# LingCloud demo report", ""]
    if inputs.wall_seconds is not None:
        out += [f"Wall time: {inputs.wall_seconds:.1f} s", ""]
    out += ["## Stages", ""]
    if inputs.summaries:
        out.append(markdown_table(
            ("stage", "output", "rows", "failures", "status", "seconds"),
            ((s.stage, s.output, s.rows, sum(s.failures.values()), "ok" if s.ok else "INCOMPLETE", f"{s.seconds:.1f}") for s in inputs.summaries),
        ))
        failures = [(s.stage, reason, n) for s in inputs.summaries for reason, n in sorted(s.failures.items(), key=lambda kv: -kv[1])]
        if failures:
            out += ["", "Failures by reason:", "", markdown_table(("stage", "reason", "rows"), failures)]
    else:
        out.append("No stage summaries.")
    if ROWS_PNG in plots:
        out += ["", f"![rows per stage]({ROWS_PNG})"]
    out += ["", "## Curation against the planted cases", ""] + _curation_section(inputs)
    out += ["", "## Training", ""]
    out += [f"- {stage}: {loss_summary(steps)}" for stage, steps in curves.items()] or ["No training metrics."]
    out += [f"- {name}: {text}" for name, text in inputs.checks.items()]
    if LOSS_PNG in plots:
        out += ["", f"![loss curves]({LOSS_PNG})"]
    out += ["", "## Accuracy per question type", ""]
    if inputs.accuracy:
        types = sorted({t for acc in inputs.accuracy.values() for t in acc})
        out.append(markdown_table(("question type", *inputs.accuracy), ((t, *(pct(a[t]) if t in a else "-" for a in inputs.accuracy.values())) for t in types)))
        out += ["", f"![accuracy per question type]({ACCURACY_PNG})"]
    else:
        out.append("Not measured.")
    if inputs.gallery:
        right = sum(e.right for e in inputs.gallery)
        out += ["", "## Held-out examples", "", f"{right} of {len(inputs.gallery)} answered right.", "",
                f"![held-out images, questions and answers]({GALLERY_PNG})", "",
                markdown_table(("question", "LMEye's answer", "truth", ""), ((e.question, e.answer, e.truth, "right" if e.right else "WRONG")
                                                                           for e in inputs.gallery))]
    out += ["", "## Benchmarks", ""]
    if inputs.scores:
        out += [f"- {line}" for line in versus_lines(inputs)] + [""]
        out.append(_scores_table(inputs.scores))
        out += ["", f"![benchmark scores]({SCORES_PNG})"]
    else:
        out.append("Not evaluated.")
    return "\n".join(out) + "\n"


def write_report(out_dir: str | Path, inputs: ReportInputs) -> Path:
    """Write ``report.md`` and its PNGs under ``out_dir``; returns the Markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {stage: read_metrics(path) for stage, path in inputs.metrics.items()}
    curves = {stage: steps for stage, steps in curves.items() if steps}
    plots: dict[str, str] = {}
    if curves:
        plots[LOSS_PNG] = str(plot_losses(curves, out / LOSS_PNG))
    if inputs.summaries:
        plots[ROWS_PNG] = str(plot_rows(inputs.summaries, out / ROWS_PNG))
    if inputs.accuracy:
        plots[ACCURACY_PNG] = str(plot_accuracy(inputs.accuracy, out / ACCURACY_PNG))
    if _score_panels(inputs.scores):
        plots[SCORES_PNG] = str(plot_scores(inputs.scores, out / SCORES_PNG))
    if inputs.gallery:
        plots[GALLERY_PNG] = str(plot_gallery(inputs.gallery, out / GALLERY_PNG))
    path = out / "report.md"
    path.write_text(render_markdown(inputs, curves, plots))
    return path


def final_summary(inputs: ReportInputs, report_path: str | Path | None = None) -> str:
    """One screen: rows per stage, failures by reason, final losses, checks, the three scores."""
    lines = ["=" * 72, "LingCloud demo: summary"]
    if inputs.wall_seconds is not None:
        lines[-1] += f" ({inputs.wall_seconds:.1f} s)"
    for s in inputs.summaries:
        failed = sum(s.failures.values())
        lines.append(f"  {s.stage:<10} {'ok ' if s.ok else 'INCOMPLETE'} {s.rows:>7} rows   {failed:>5} failed")
        for reason, n in sorted(s.failures.items(), key=lambda kv: -kv[1])[:3]:
            lines.append(f"             {n:>5}  {reason[:56]}")
    for stage, path in inputs.metrics.items():
        lines.append(f"  {stage}: {loss_summary(read_metrics(path))}")
    lines += [f"  {name}: {text}" for name, text in inputs.checks.items()]
    lines += [f"  {headline(result)}" for result in inputs.scores.values()]
    lines += [f"  {line}" for line in versus_lines(inputs)]
    if report_path is not None:
        lines.append(f"  report: {report_path}")
    lines.append("=" * 72)
    return "\n".join(lines)
