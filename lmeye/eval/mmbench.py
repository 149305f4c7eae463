"""MMBench: multiple choice from the released TSV, scored with CircularEval.

Layout: a TSV with a header holding at least ``index, question, A, B, answer, category,
l2-category, image`` (``hint``, ``C``, ``D``, ``source``, ``split``, ``comment`` optional); ``image`` is
base64, or (as in VLMEvalKit's TSVs) the ``index`` of an earlier row whose image it shares. Rows of a
"legacy" TSV with ``index >= 1e6`` are pre-rotated copies; they are skipped since rotation is done here.

CircularEval (VLMEvalKit ``tools.py::CIRCULAR`` / ``mcq_circular_eval``): an N-option question is
asked N times; in pass i the letter j holds original option (j + i) mod N, and the question counts as
right only if every pass is right. Every question with 2-4 options is rotated.

Answer extraction is VLMEvalKit's rule-based ``can_infer`` (``matching_util.py`` at 23757c43) with
exact matching, i.e. no LLM judge: an option letter standing alone among the last 4 tokens after
``.()[],:;!*#{}`` become spaces, else the one option whose text the answer contains (answers longer
than twice the options' total length are not searched). An answer that yields nothing is
*unparsed*: counted, and wrong. A refusal ("Cannot determine the answer", or a lone ``Z``) is wrong.

Prompt (LLaVA ``model_vqa_mmbench.py``): ``hint\\n`` (skipped when empty/nan/none) + question +
``\\nA. ...`` per option + ``\\nAnswer with the option's letter from the given choices directly.``
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from lmeye.eval.common import Answerer, LayoutError, markdown_table, open_image, pct, progress, ratio, write_result

LETTERS = ("A", "B", "C", "D")
REQUIRED = ("index", "question", "A", "B", "answer", "category", "l2-category", "image")
LEGACY_OFFSET = 1_000_000
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
PUNCTUATION = ".()[],:;!*#{}"


@dataclass(frozen=True)
class MMBQuestion:
    index: int
    question: str
    hint: Optional[str]
    options: tuple[str, ...]  # option texts, in letter order
    answer: str  # letter
    category: str
    l2_category: str
    image: str  # base64
    where: str  # "<path>:<line>", for error messages


@dataclass(frozen=True)
class MMBAnswer:
    """One CircularEval pass, answered."""

    index: int
    rotation: int
    options: tuple[str, ...]
    answer: str  # the right letter in this pass
    category: str
    l2_category: str
    response: str


# ---------------------------------------------------------------------------------------------
# Reading


def _blank(value: Optional[str]) -> bool:
    return value is None or value.strip().lower() in ("", "nan", "none")


def _decode_check(b64: str, where: str) -> None:
    try:
        base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise LayoutError(f"{where}: column 'image' is neither base64 nor the index of another row") from None


def read_mmbench(path: str | Path) -> list[MMBQuestion]:
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: not a file (MMBench expects the released TSV)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")  # pandas-written: minimal quoting
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise LayoutError(f"{path}:1: missing column(s) {', '.join(missing)}; the MMBench TSV has {', '.join(REQUIRED)}")
        images: dict[str, str] = {}
        questions = []
        for line, row in enumerate(reader, 2):
            questions.append(_question(row, f"{path}:{line}", images))
    if not questions:
        raise LayoutError(f"{path}: no rows")
    return [q for q in questions if q is not None]


def _question(row: dict[str, Optional[str]], where: str, images: dict[str, str]) -> Optional[MMBQuestion]:
    try:
        index = int(float(row["index"]))
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: column 'index' is {row['index']!r}, not a number") from None
    image = (row["image"] or "").strip()
    if image in images:  # VLMEvalKit stores a repeated image as the index of the row that has it
        image = images[image]
    elif len(image) <= 64 and image.isdigit():
        raise LayoutError(f"{where}: column 'image' refers to row index {image}, which is not an earlier row")
    else:
        _decode_check(image, where)
    images[str(index)] = image
    if index >= LEGACY_OFFSET:
        return None  # a legacy pre-rotated copy
    options = []
    for letter in LETTERS:
        if _blank(row.get(letter)):
            break
        options.append(row[letter].strip())
    if len(options) < 2:
        raise LayoutError(f"{where}: fewer than 2 options (columns A, B)")
    answer = (row["answer"] or "").strip()
    if answer not in LETTERS[: len(options)]:
        hidden = " (the test split's answers are hidden; score the dev split)" if not answer else ""
        raise LayoutError(f"{where}: column 'answer' is {answer!r}; expected one of {', '.join(LETTERS[: len(options)])}{hidden}")
    for column in ("question", "category", "l2-category"):
        if _blank(row[column]):
            raise LayoutError(f"{where}: column {column!r} is empty")
    hint = None if _blank(row.get("hint")) else row["hint"].strip()
    return MMBQuestion(index, row["question"].strip(), hint, tuple(options), answer, row["category"].strip(),
                       row["l2-category"].strip(), image, where)


# ---------------------------------------------------------------------------------------------
# CircularEval, prompt and extraction (pure)


def rotations(options: tuple[str, ...], answer: str) -> list[tuple[tuple[str, ...], str]]:
    """Pass i: letter j holds option (j + i) mod N; returns (options, right letter) per pass."""
    n, a = len(options), LETTERS.index(answer)
    return [(options[i:] + options[:i], LETTERS[(a - i) % n]) for i in range(n)]


def build_prompt(question: str, hint: Optional[str], options: tuple[str, ...]) -> str:
    lines = ([hint] if not _blank(hint) else []) + [question]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    return "\n".join(lines + [PROMPT_SUFFIX])


def _infer_option(answer: str, letters: tuple[str, ...]) -> Optional[str]:
    if any(r in answer for r in REFUSALS):
        return "Z"
    for c in PUNCTUATION:
        answer = answer.replace(c, " ")
    tokens = answer.split()
    found = [letter for letter in letters if letter in tokens]
    if len(found) == 1:
        if tokens.index(found[0]) > len(tokens) - 5:  # among the last 4 tokens
            return found[0]
    elif not found and "Z" in tokens:
        return "Z"
    return None


def _infer_text(answer: str, options: tuple[str, ...]) -> Optional[str]:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(o) for o in options):
        return None
    found = [letter for letter, text in zip(LETTERS, options) if text.lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_choice(response: str, options: tuple[str, ...]) -> Optional[str]:
    """The chosen letter, "Z" for a refusal, or None when nothing can be read off the response."""
    letters = LETTERS[: len(options)]
    return _infer_option(response, letters) or _infer_text(response, options)


def _accuracy(hits: dict[int, bool], keys: dict[int, str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for index, hit in hits.items():
        groups[keys[index]].append(hit)
    return {k: ratio(sum(v), len(v)) for k, v in sorted(groups.items())}


def score_mmbench(answers: Iterable[MMBAnswer]) -> dict[str, Any]:
    passes: dict[int, list[tuple[MMBAnswer, Optional[str]]]] = defaultdict(list)
    for a in answers:
        passes[a.index].append((a, extract_choice(a.response, a.options)))
    hits = {i: all(pred == a.answer for a, pred in ps) for i, ps in passes.items()}
    first = [pred == a.answer for ps in passes.values() for a, pred in ps if a.rotation == 0]
    category = {i: ps[0][0].category for i, ps in passes.items()}
    l2 = {i: ps[0][0].l2_category for i, ps in passes.items()}
    preds = [pred for ps in passes.values() for _, pred in ps]
    return {
        "benchmark": "mmbench",
        "rule": "CircularEval; VLMEvalKit rule-based can_infer, exact matching (no LLM judge); unparsed = wrong",
        "questions": len(hits),
        "passes": len(preds),
        "overall": ratio(sum(hits.values()), len(hits)),
        "single_pass": ratio(sum(first), len(first)),  # rotation 0 only, for reference
        "l2_category": _accuracy(hits, l2),
        "category": _accuracy(hits, category),
        "unparsed": sum(p is None for p in preds),
        "unparsed_questions": sum(any(p is None for _, p in ps) for ps in passes.values()),
        "refused": sum(p == "Z" for p in preds),
    }


def markdown_mmbench(result: dict[str, Any]) -> str:
    parts = [
        "# MMBench (CircularEval)\n",
        f"**Overall: {pct(result['overall'])}%** over {result['questions']} questions "
        f"({result['passes']} passes; single pass: {pct(result['single_pass'])}%)\n",
        f"Unparsed answers (counted wrong): {result['unparsed']} of {result['passes']} passes, "
        f"in {result['unparsed_questions']} questions; refusals: {result['refused']}.\n",
        "## Per l2-category\n",
        markdown_table(("l2-category", "accuracy %"), ((k, pct(v)) for k, v in result["l2_category"].items())) + "\n",
        "## Per category\n",
        markdown_table(("category", "accuracy %"), ((k, pct(v)) for k, v in result["category"].items())),
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Running


def answer_mmbench(answerer: Answerer, questions: list[MMBQuestion]) -> list[MMBAnswer]:
    answers = []
    for i, q in enumerate(questions, 1):
        image = open_image(base64.b64decode(q.image), f"{q.where} (column 'image')")
        for rotation, (options, right) in enumerate(rotations(q.options, q.answer)):
            response = answerer.answer(image, build_prompt(q.question, q.hint, options))
            answers.append(MMBAnswer(q.index, rotation, options, right, q.category, q.l2_category, response))
        progress(i, len(questions), "mmbench")
    return answers


def evaluate_mmbench(answerer: Answerer, data: str | Path, out_dir: str | Path, limit: int | None = None) -> dict[str, Any]:
    questions = read_mmbench(data)[:limit]
    answers = answer_mmbench(answerer, questions)
    result = score_mmbench(answers)
    result["data"] = str(data)
    out = Path(out_dir)
    write_result(out, "mmbench", result, markdown_mmbench(result))
    with (out / "mmbench_answers.jsonl").open("w") as handle:
        for a in answers:
            row = asdict(a) | {"extracted": extract_choice(a.response, a.options)}
            handle.write(json.dumps(row) + "\n")
    return result
