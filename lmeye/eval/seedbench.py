"""SEED-Bench (v1, image part): four-way multiple choice ranked by likelihood.

Layout (SEED-Bench ``DATASET.md``): ``SEED-Bench.json`` = ``{"questions": [...], "question_type":
{name: id}}``; an image item has ``question, choice_a..choice_d, answer (A-D), question_type_id,
data_id`` (the image's file name under the image folder, ``SEED-Bench-image/`` beside the JSON by
default) and ``data_type: "image"``. Items of other data types, and dimensions outside 1-9, are left
out (``eval.py --task image``) and counted in the summary (``video_left_out``).

Per-question output: ``seedbench_results.jsonl``, one ``{question_id, prediction, gt, question_type_id}``
per line, the form SEED-Bench's ``eval.py`` writes and its leaderboard takes (``q_type_id``, the
name ``eval.py``'s own accuracy loop reads, is written too). ``seedbench_answers.jsonl`` keeps the
choice log-likelihoods; an interrupted run resumes from it.

Ranking (SEED-Bench ``EVALUATION.md``): the model's likelihood of generating each choice's text
given the question; the prediction is the most likely choice (ties go to the earlier letter). The
likelihood is the SUM of the choice's token log-probabilities, as SEED-Bench's InstructBLIP
interface computes it (its repository also has mean-per-token interfaces; this one rule is used).
The question is the user turn; the model never has to emit a letter. Accuracy per dimension, and
overall = correct / questions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from lmeye.eval.common import Answerer, LayoutError, answer_all, markdown_table, open_image, pct, ratio, write_result

LETTERS = ("A", "B", "C", "D")
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")
REQUIRED = ("question", *CHOICE_KEYS, "answer", "question_type_id", "data_id")
# SEED-Bench DATASET.md's question_type (SEED-Bench-1 and -2 agree): 3 is Attributes, 4 is Location.
DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
}
DEFAULT_JSON = "SEED-Bench.json"
DEFAULT_IMAGE_DIR = "SEED-Bench-image"


@dataclass(frozen=True)
class SeedQuestion:
    question_id: Any
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # letter
    type_id: int
    image_path: Path
    where: str


@dataclass(frozen=True)
class SeedAnswer:
    question_id: Any
    type_id: int
    answer: str
    logliks: tuple[float, ...]  # one per choice, A..D


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_paths(data: str | Path, image_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(JSON file, image folder): ``data`` is the JSON or a folder holding ``SEED-Bench.json``."""
    data = Path(data)
    json_path = data / DEFAULT_JSON if data.is_dir() else data
    if not json_path.is_file():
        raise LayoutError(f"{json_path}: not found (SEED-Bench expects its JSON, e.g. {DEFAULT_JSON})")
    if image_dir is None:
        nested = json_path.parent / DEFAULT_IMAGE_DIR
        image_dir = nested if nested.is_dir() else json_path.parent
    return json_path, Path(image_dir)


@dataclass(frozen=True)
class SeedSet:
    questions: list[SeedQuestion]
    names: dict[int, str]  # dimension id -> name (the JSON's ``question_type`` over DIMENSIONS)
    left_out: int  # video items (another data type, or a dimension outside 1-9)


def read_seedbench(data: str | Path, image_dir: str | Path | None = None) -> SeedSet:
    """The image questions, the dimension names and how many video items were left out."""
    json_path, image_dir = resolve_paths(data, image_dir)
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise LayoutError(f'{json_path}: expected {{"questions": [...], "question_type": {{...}}}}')
    names = dict(DIMENSIONS)
    for name, type_id in (doc.get("question_type") or {}).items():
        if isinstance(type_id, int) and type_id in DIMENSIONS:
            names[type_id] = name
    questions, seen = [], {}
    for i, item in enumerate(doc["questions"]):
        q = _question(item, f"{json_path}: questions[{i}]", image_dir)
        if q is None:
            continue
        if q.question_id in seen:
            raise LayoutError(f"{q.where}: question_id {q.question_id!r} is also that of {seen[q.question_id]}")
        seen[q.question_id] = q.where.split(": ")[-1]
        questions.append(q)
    if not questions:
        raise LayoutError(f"{json_path}: no image questions (data_type 'image', question_type_id 1-9)")
    return SeedSet(questions, names, len(doc["questions"]) - len(questions))


def _question(item: Any, where: str, image_dir: Path) -> Optional[SeedQuestion]:
    if not isinstance(item, dict):
        raise LayoutError(f"{where}: expected an object")
    if item.get("data_type", "image") != "image":
        return None  # video items
    missing = [k for k in REQUIRED if k not in item]
    if missing:
        raise LayoutError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        type_id = int(item["question_type_id"])
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: question_type_id is {item['question_type_id']!r}, not a number") from None
    if type_id not in DIMENSIONS:
        return None
    answer = str(item["answer"]).strip()
    if answer not in LETTERS:
        raise LayoutError(f"{where}: answer is {answer!r}; expected one of A, B, C, D")
    choices = tuple(str(item[k]) for k in CHOICE_KEYS)
    qid = item.get("question_id", where)  # as the JSON has it (a string in the release): the results echo it
    return SeedQuestion(qid, str(item["question"]), choices, answer, type_id, image_dir / str(item["data_id"]), where)


# ---------------------------------------------------------------------------------------------
# Scoring (pure)


def predict(logliks: Iterable[float]) -> str:
    """The most likely choice's letter; ties go to the earlier letter."""
    values = list(logliks)
    return LETTERS[max(range(len(values)), key=lambda i: (values[i], -i))]


def score_seedbench(answers: Iterable[SeedAnswer], names: dict[int, str] | None = None, left_out: int = 0) -> dict[str, Any]:
    names = names or DIMENSIONS
    per_type: dict[int, list[bool]] = defaultdict(list)
    guess = []  # a uniform guess's chance of each question
    for a in answers:
        per_type[a.type_id].append(predict(a.logliks) == a.answer)
        guess.append(1 / len(a.logliks))
    total = sum(len(v) for v in per_type.values())
    return {
        "benchmark": "seedbench",
        "rule": "argmax of summed choice log-likelihood given the question (ties: earlier letter)",
        "questions": total,
        "video_left_out": left_out,
        "correct": sum(sum(v) for v in per_type.values()),
        "overall": ratio(sum(sum(v) for v in per_type.values()), total),
        "chance": ratio(sum(guess), len(guess)) if guess else 0.0,
        "dimensions": {
            names.get(t, str(t)): {"id": t, "questions": len(v), "correct": sum(v), "accuracy": ratio(sum(v), len(v))}
            for t, v in sorted(per_type.items())
        },
    }


def markdown_seedbench(result: dict[str, Any]) -> str:
    rows = [(d["id"], name, d["questions"], d["correct"], pct(d["accuracy"])) for name, d in result["dimensions"].items()]
    return (
        "# SEED-Bench (image)\n\n"
        + markdown_table(("id", "dimension", "questions", "correct", "accuracy %"), rows)
        + f"\n\n**Overall: {pct(result['overall'])}%** ({result['correct']} of {result['questions']})\n\n"
        + f"Video items left out (image task only): {result.get('video_left_out', 0)}.\n"
    )


# ---------------------------------------------------------------------------------------------
# Running


def _key(q: SeedQuestion) -> str:
    return f"{q.question_id}|{q.question}|{'|'.join(q.choices)}"


def answer_seedbench(answerer: Answerer, questions: list[SeedQuestion], results: Path, batch_size: int = 1) -> list[SeedAnswer]:
    """Choice log-likelihoods in batches; ``results`` (JSONL) is written as they come, and resumed from."""

    def ask(batch: list[SeedQuestion]) -> list[dict[str, Any]]:
        images = [open_image(q.image_path, f"{q.where}: data_id {q.image_path.name} ({q.image_path})") for q in batch]
        scores = answerer.choice_loglik(images, [q.question for q in batch], [list(q.choices) for q in batch])
        records = []
        for q, logliks in zip(batch, scores):
            logliks = [float(x) for x in logliks]
            if len(logliks) != len(q.choices):
                raise RuntimeError(f"choice_loglik returned {len(logliks)} scores for {len(q.choices)} choices")
            records.append({"question_id": q.question_id, "type_id": q.type_id, "answer": q.answer, "logliks": logliks})
        return records

    records = answer_all(questions, _key, ask, results, answerer.name, batch_size, "seedbench")
    return [SeedAnswer(r["question_id"], r["type_id"], r["answer"], tuple(r["logliks"])) for r in records]


def official_records(answers: Iterable[SeedAnswer]) -> list[dict[str, Any]]:
    """Per question, SEED-Bench ``eval.py``'s answer record."""
    return [
        {"question_id": a.question_id, "prediction": predict(a.logliks), "gt": a.answer, "question_type_id": a.type_id, "q_type_id": a.type_id}
        for a in answers
    ]


def evaluate_seedbench(
    answerer: Answerer, data: str | Path, out_dir: str | Path, limit: int | None = None, image_dir: str | Path | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    seed = read_seedbench(data, image_dir)
    out = Path(out_dir)
    answers = answer_seedbench(answerer, seed.questions[:limit], out / "seedbench_answers.jsonl", batch_size)
    result = score_seedbench(answers, seed.names, seed.left_out)
    result["data"] = str(data)
    write_result(out, "seedbench", result, markdown_seedbench(result))
    (out / "seedbench_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in official_records(answers)), encoding="utf-8")
    return result
