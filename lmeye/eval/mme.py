"""MME: yes/no questions, two per image, scored per subtask as acc + acc+ (x100 each).

Layout (the release, as LLaVA's ``convert_answer_to_mme.py`` reads it): ``<root>/<subtask>/`` holds
either ``images/<stem>.<ext>`` with ``questions_answers_YN/<stem>.txt``, or ``<stem>.<ext>`` beside
``<stem>.txt``. Each question file has two lines ``question<TAB>Yes|No`` (the official tool pairs
consecutive lines and asserts two per image).

Scoring is the official ``eval_tool/calculation.py``: the lowercased response is "yes" or "no" if it
is exactly that, else "yes" if its first 4 characters contain "yes", else "no" if they contain "no",
else "other", which counts as wrong. acc = right / questions; acc+ = images with both questions
right / images; score = 100*acc + 100*acc+. Perception and cognition are sums over their subtasks.
The answers are also written in the official tool's input layout (``mme_results/<subtask>.txt``, all
14 subtasks, no tab or newline inside a response), and per question to ``mme_answers.jsonl``, from
which an interrupted run resumes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmeye.eval.common import Answerer, LayoutError, answer_all, markdown_table, open_image, pct, ratio, write_result

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
QUESTIONS_PER_IMAGE = 2


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # file name, as in the official results files
    image_path: Path
    question: str
    truth: str  # "Yes" or "No"


@dataclass(frozen=True)
class MMEAnswer:
    subtask: str
    image: str
    question: str
    truth: str
    response: str


# ---------------------------------------------------------------------------------------------
# Reading


def _read_question_file(path: Path, subtask: str, image: Path) -> list[MMEQuestion]:
    if not path.is_file():
        raise LayoutError(f"{path}: missing (the question file of {image})")
    questions = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            raise LayoutError(f"{path}:{lineno}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
        questions.append(MMEQuestion(subtask, image.name, image, fields[0], fields[1].strip().capitalize()))
    if len(questions) != QUESTIONS_PER_IMAGE:
        raise LayoutError(f"{path}: {len(questions)} questions; MME has exactly {QUESTIONS_PER_IMAGE} per image")
    return questions


def _read_subtask(folder: Path) -> list[MMEQuestion]:
    nested = folder / "images"
    image_dir, qa_dir = (nested, folder / "questions_answers_YN") if nested.is_dir() else (folder, folder)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise LayoutError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this MME subtask")
    return [q for image in images for q in _read_question_file(qa_dir / f"{image.stem}.txt", folder.name, image)]


def read_mme(root: str | Path) -> list[MMEQuestion]:
    """Every question of every subtask folder found under ``root`` (folders with other names are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder (MME expects <root>/<subtask>/...)")
    folders = [root / name for name in SUBTASKS if (root / name).is_dir()]
    if not folders:
        raise LayoutError(f"{root}: no MME subtask folders; expected some of {', '.join(SUBTASKS)}")
    return [q for folder in folders for q in _read_subtask(folder)]


# ---------------------------------------------------------------------------------------------
# Scoring (pure)


def parse_yes_no(response: str) -> str:
    """The official ``parse_pred_ans``: "yes", "no" or "other" (no strip, as the tool has none)."""
    pred = response.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(answers: Iterable[MMEAnswer]) -> dict[str, Any]:
    by_subtask: dict[str, list[MMEAnswer]] = defaultdict(list)
    for a in answers:
        by_subtask[a.subtask].append(a)
    subtasks: dict[str, dict[str, Any]] = {}
    for name in sorted(by_subtask, key=lambda n: SUBTASKS.index(n) if n in SUBTASKS else len(SUBTASKS)):
        rows = by_subtask[name]
        right = [parse_yes_no(a.response) == a.truth.lower() for a in rows]
        per_image: dict[str, list[bool]] = defaultdict(list)
        for a, ok in zip(rows, right):
            per_image[a.image].append(ok)
        acc = ratio(sum(right), len(rows))
        acc_plus = ratio(sum(all(v) for v in per_image.values()), len(per_image))
        subtasks[name] = {
            "group": "cognition" if name in COGNITION else "perception",
            "questions": len(rows),
            "images": len(per_image),
            "correct": sum(right),
            "images_both_correct": sum(all(v) for v in per_image.values()),
            "other": sum(parse_yes_no(a.response) == "other" for a in rows),
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * acc + 100 * acc_plus,
        }
    totals = {g: sum(s["score"] for s in subtasks.values() if s["group"] == g) for g in ("perception", "cognition")}
    return {
        "benchmark": "mme",
        "rule": "official eval_tool: exact yes/no, else 'yes'/'no' in the first 4 characters, else other (wrong)",
        "subtasks": subtasks,
        "perception": totals["perception"],
        "cognition": totals["cognition"],
        "questions": sum(s["questions"] for s in subtasks.values()),
        "accuracy": ratio(sum(s["correct"] for s in subtasks.values()), sum(s["questions"] for s in subtasks.values())),
        "chance": 0.5,  # accuracy of a coin flip between yes and no
        "other": sum(s["other"] for s in subtasks.values()),
    }


def markdown_mme(result: dict[str, Any]) -> str:
    rows = [
        (name, s["group"], s["images"], s["questions"], pct(s["acc"]), pct(s["acc_plus"]), f"{s['score']:.2f}", s["other"])
        for name, s in result["subtasks"].items()
    ]
    table = markdown_table(("subtask", "group", "images", "questions", "acc", "acc+", "score", "other"), rows)
    return (
        "# MME\n\n" + table + "\n\n"
        f"**Perception: {result['perception']:.2f}**  \n**Cognition: {result['cognition']:.2f}**\n\n"
        f"Answers parsed as neither yes nor no (counted wrong): {result['other']} of {result['questions']}.\n"
    )


# ---------------------------------------------------------------------------------------------
# Running


def _one_line(text: str) -> str:
    # The official results files are one line per question, four tab-separated fields: a newline or a
    # tab inside a response would shift the tool's columns. The parse then sees what the tool would.
    return text.replace("\r", " ").replace("\n", " ").replace("\t", " ")


def _key(q: MMEQuestion) -> str:
    return f"{q.subtask}/{q.image}|{q.question}"


def answer_mme(answerer: Answerer, questions: list[MMEQuestion], results: Path, batch_size: int = 1) -> list[MMEAnswer]:
    """Answers in batches; ``results`` (JSONL, one record per question) is written as they come and an
    interrupted run resumes from it."""

    def ask(batch: list[MMEQuestion]) -> list[dict[str, Any]]:
        images: dict[Path, Any] = {}  # the two questions of an image usually share a batch
        for q in batch:
            if q.image_path not in images:
                images[q.image_path] = open_image(q.image_path, str(q.image_path))
        responses = answerer.answer([images[q.image_path] for q in batch], [q.question for q in batch])
        return [{"subtask": q.subtask, "image": q.image, "question": q.question, "truth": q.truth, "response": _one_line(r)}
                for q, r in zip(batch, responses)]

    records = answer_all(questions, _key, ask, results, answerer.name, batch_size, "mme")
    return [MMEAnswer(r["subtask"], r["image"], r["question"], r["truth"], r["response"]) for r in records]


def write_official_results(answers: list[MMEAnswer], folder: Path) -> None:
    """``<subtask>.txt`` for EVERY subtask (``calculation.py`` opens all 14; a subtask not evaluated gets
    an empty file): ``Image_Name<TAB>Question<TAB>Ground_Truth<TAB>Response`` per line, the two
    questions of an image adjacent (the tool pairs consecutive lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    by_subtask: dict[str, list[str]] = {name: [] for name in SUBTASKS}
    for a in answers:
        by_subtask[a.subtask].append("\t".join((a.image, a.question, a.truth, _one_line(a.response))))
    for name, lines in by_subtask.items():
        (folder / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def evaluate_mme(
    answerer: Answerer, data: str | Path, out_dir: str | Path, limit: int | None = None, batch_size: int = 1
) -> dict[str, Any]:
    questions = read_mme(data)
    if limit is not None:
        questions = questions[: 2 * limit]  # whole images only
    answers = answer_mme(answerer, questions, Path(out_dir) / "mme_answers.jsonl", batch_size)
    result = score_mme(answers)
    result["data"] = str(data)
    write_official_results(answers, Path(out_dir) / "mme_results")
    write_result(out_dir, "mme", result, markdown_mme(result))
    return result
