"""What every benchmark shares: the model protocol, image loading, layout errors, result writing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, Sequence

from lmeye.errors import UserError


class LayoutError(UserError):
    """A benchmark file or folder is not in the released layout; the message names the path (and row)."""


class Answerer(Protocol):
    """The model as the benchmarks see it. ``image`` is None for a text-only question."""

    def answer(self, image: Optional["PIL.Image.Image"], question: str) -> str:  # noqa: F821
        """A free-text answer (MME, MMBench)."""

    def choice_loglik(self, image: Optional["PIL.Image.Image"], question: str, choices: list[str]) -> list[float]:  # noqa: F821
        """Per choice, the log-likelihood of the model generating that choice's text after ``question``:
        the SUM over the choice's tokens (SEED-Bench's ranking rule, as its InstructBLIP interface does)."""


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


def headline(result: dict[str, Any]) -> str:
    """One line with a benchmark's main score(s), from its result dict."""
    name = result["benchmark"]
    if name == "mme":
        return f"MME perception {result['perception']:.2f}, cognition {result['cognition']:.2f} ({result['other']} unparsed)"
    if name == "mmbench":
        return f"MMBench CircularEval {pct(result['overall'])}% ({result['unparsed']} unparsed of {result['passes']} passes)"
    return f"SEED-Bench {pct(result['overall'])}% ({result['correct']}/{result['questions']})"
