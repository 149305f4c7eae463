"""What every benchmark shares: the model protocol, image loading, layout errors, result writing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, TypeVar

from lmeye.errors import UserError


class LayoutError(UserError):
    """A benchmark file or folder is not in the released layout; the message names the path (and row)."""


class Answerer(Protocol):
    """The model as the benchmarks see it, a batch of questions at a time (one image per question;
    None for a text-only question). ``name`` identifies the model, so that answers resumed from an
    interrupted run are never those of another checkpoint."""

    name: str

    def answer(self, images: Sequence[Optional["PIL.Image.Image"]], questions: Sequence[str]) -> list[str]:  # noqa: F821
        """A free-text answer per question (MME, MMBench)."""

    def choice_loglik(
        self, images: Sequence[Optional["PIL.Image.Image"]], questions: Sequence[str], choices: Sequence[Sequence[str]]  # noqa: F821
    ) -> list[list[float]]:
        """Per question, per choice: the log-likelihood of the model generating that choice's text after
        the question, the SUM over the choice's tokens (SEED-Bench's ranking rule, as its InstructBLIP
        interface does)."""


def open_image(source: str | Path | bytes, where: str) -> "PIL.Image.Image":  # noqa: F821
    """Decode an image (a path or raw bytes) to RGB; a file that cannot be read names ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError:
        raise LayoutError(f"{where}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise LayoutError(f"{where}: cannot open the image ({err})") from None


def ratio(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out_dir: str | Path, name: str, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def progress(done: int, total: int, label: str, every: int = 50) -> None:
    if done == total or done % every == 0:
        print(f"[eval {label}] {done}/{total}", flush=True)


T = TypeVar("T")


def read_records(path: Path, model: str) -> dict[str, dict[str, Any]]:
    """The per-question records of an interrupted run (``key`` -> record) that ``model`` wrote. A torn
    last line (the run was killed while writing it) is dropped; a bad line elsewhere is an error."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                break
            raise LayoutError(f"{path}:{lineno}: not a JSON record; delete the file to start this benchmark over") from None
        if not isinstance(record, dict) or "key" not in record:
            raise LayoutError(f"{path}:{lineno}: a record without 'key'; delete the file to start this benchmark over")
        if record.get("model") == model:
            records[record["key"]] = record
    return records


def answer_all(
    items: Sequence[T], key: Callable[[T], str], ask: Callable[[list[T]], list[dict[str, Any]]],
    path: str | Path, model: str, batch_size: int, label: str,
) -> list[dict[str, Any]]:
    """One record per item, in ``items`` order, asking ``ask`` only for the items ``path`` has no record
    of (same ``key``, which holds the question's id AND its text, and same ``model``: a resumed run
    never reuses another question's or another model's answer). Each batch's records are appended to ``path`` as they come, so an
    interrupted run loses at most the batch in flight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [key(it) for it in items]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise LayoutError(f"two {label} questions are the same question ({twice.split('|')[0]}); each must be unique")
    done = read_records(path, model)
    pending = [it for it in items if key(it) not in done]
    kept = [done[key(it)] for it in items if key(it) in done]
    # Rewritten first, with only this run's reusable records: the file never mixes models or data sets.
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    if kept:
        print(f"[eval {label}] resuming: {len(kept)} of {len(items)} answers already in {path}", flush=True)
    with path.open("a", encoding="utf-8") as handle:
        for start in range(0, len(pending), max(1, batch_size)):
            batch = pending[start : start + batch_size]
            records = ask(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"the model answered {len(records)} of {len(batch)} questions")
            for item, record in zip(batch, records):
                record = {"key": key(item), "model": model, **record}
                done[record["key"]] = record
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            progress(len(kept) + start + len(batch), len(items), label, every=max(50, batch_size))
    return [done[key(it)] for it in items]


def headline(result: dict[str, Any]) -> str:
    """One line with a benchmark's main score(s), from its result dict."""
    name = result["benchmark"]
    if name == "mme":
        return f"MME perception {result['perception']:.2f}, cognition {result['cognition']:.2f} ({result['other']} unparsed)"
    if name == "mmbench" and result.get("split") == "test":
        return f"MMBench test split: {result['passes']} rows answered; submission {result['submission']}"
    if name == "mmbench":
        return f"MMBench CircularEval {pct(result['overall'])}% ({result['unparsed']} unparsed of {result['passes']} passes)"
    return (f"SEED-Bench {pct(result['overall'])}% ({result['correct']}/{result['questions']}; "
            f"{result.get('video_left_out', 0)} video items left out)")
