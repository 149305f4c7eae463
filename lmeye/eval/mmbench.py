"""MMBench: multiple choice from the released TSV, scored with CircularEval.

Layout: a TSV with a header holding at least ``index, question, A, B, category, l2-category, image``
(``answer`` on the dev split; ``hint``, more option columns ``C``..``Z``, ``source``, ``split``,
``comment`` optional); ``image`` is base64, or (as in VLMEvalKit's TSVs) the ``index`` of an earlier
row whose image it shares. A value is *missing* when pandas would read it as NaN (``''``, ``NA``,
``N/A``, ``null``, ``NaN``, ``None``, ... pandas' default ``na_values``); ``none`` is text. Every
non-missing option is kept, under its own letter.

CircularEval (VLMEvalKit ``tools.py::CIRCULAR`` / ``mcq_circular_eval``): an N-option question is
asked N times; in pass i the letter j holds original option (j + i) mod N, and the question counts as
right only if every pass is right. Rows VLMEvalKit calls *abnormal* are asked once, not rotated: an
option whose text names two or more of the choice letters as words ("Both A and B"), an option that is
itself a letter, or no options at all; so is a row whose options leave a gap (A, B, D), which
VLMEvalKit's rotation cannot take. A TSV that already carries the circular copies (any ``index >=
1,000,000``: VLMEvalKit's ``_circular.tsv``, the legacy files) is not rotated again: its rows are the
passes, grouped by ``index % 1,000,000``.

The test split (no ``answer`` column, or every answer missing) is not scored: each row is asked once
and ``mmbench_submission.xlsx`` is written in the layout the MMBench server takes (LLaVA's
``convert_mmbench_for_submission.py``: the TSV's columns without ``hint, category, source, image,
comment, l2-category``, with ``prediction`` inserted as the 7th column).

Answer extraction is VLMEvalKit's rule-based ``can_infer`` (``matching_util.py`` at 23757c43) with
exact matching, i.e. no LLM judge: an option letter standing alone among the last 4 tokens after
``.()[],:;!*#{}`` become spaces, else the one option whose text the answer contains (answers longer
than twice the options' total length are not searched). An answer that yields nothing is
*unparsed*: counted, and wrong. A refusal ("Cannot determine the answer", or a lone ``Z``) is wrong.

Prompt (LLaVA ``model_vqa_mmbench.py``): ``hint\\n`` (skipped when missing) + question + ``\\nA. ...``
per option + ``\\nAnswer with the option's letter from the given choices directly.`` Every pass's
prompt is recorded in ``mmbench_answers.jsonl``, from which an interrupted run resumes.
"""

from __future__ import annotations

import base64
import binascii
import csv
import string
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from lmeye.eval.common import Answerer, LayoutError, answer_all, markdown_table, open_image, pct, ratio, write_result

LETTERS = tuple(string.ascii_uppercase)
REQUIRED = ("index", "question", "A", "B", "category", "l2-category", "image")
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit: pass i of question g has index g + i * 1e6
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
PUNCTUATION = ".()[],:;!*#{}"
# pandas' default na_values (pandas._libs.parsers.STR_NA_VALUES, pandas 2): what VLMEvalKit's
# ``pd.read_csv(sep="\t")`` reads as NaN. Exact matches only; "none" (lower case) stays text.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})
SUBMISSION_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
SUBMISSION_FILE = "mmbench_submission.xlsx"

Options = tuple[tuple[str, str], ...]  # (letter, text), in column order


@dataclass(frozen=True)
class MMBQuestion:
    """One TSV row."""

    index: int
    question: str
    hint: Optional[str]
    options: Options
    answer: Optional[str]  # letter; None on the test split
    category: str
    l2_category: str
    image: str  # base64
    abnormal: bool  # asked once, not rotated
    fields: tuple[tuple[str, str], ...]  # the row's columns but the image, for the submission file
    where: str  # "<path>:<line>", for error messages


@dataclass(frozen=True)
class MMBPass:
    """One question as asked: a CircularEval pass."""

    question: MMBQuestion
    group: int  # the question it is a pass of (VLMEvalKit's g_index)
    rotation: int
    options: Options
    answer: Optional[str]  # the right letter in this pass
    prompt: str


# ---------------------------------------------------------------------------------------------
# Reading


def missing(value: Optional[str]) -> bool:
    """What pandas reads as NaN (see PANDAS_NA)."""
    return value is None or value in PANDAS_NA


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
        columns = reader.fieldnames or []
        missing_columns = [c for c in REQUIRED if c not in columns]
        if missing_columns:
            raise LayoutError(f"{path}:1: missing column(s) {', '.join(missing_columns)}; the MMBench TSV has {', '.join(REQUIRED)}")
        letters = tuple(letter for letter in LETTERS if letter in columns)
        images: dict[str, str] = {}
        questions = [_question(row, letters, f"{path}:{line}", images) for line, row in enumerate(reader, 2)]
    if not questions:
        raise LayoutError(f"{path}: no rows")
    answered = [q.answer is not None for q in questions]
    if any(answered) and not all(answered):
        where = questions[answered.index(False)].where
        raise LayoutError(f"{where}: column 'answer' is missing here but not in other rows (a dev TSV has every answer, a test TSV none)")
    return questions


def _question(row: dict[str, Optional[str]], letters: tuple[str, ...], where: str, images: dict[str, str]) -> MMBQuestion:
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
    options = tuple((letter, row[letter]) for letter in letters if not missing(row.get(letter)))
    if len(options) == 1:
        raise LayoutError(f"{where}: one option (column {options[0][0]}); MMBench questions have 2 or more, or none")
    answer = None if missing(row.get("answer")) else row["answer"].strip()
    if answer is not None and options and answer not in dict(options):  # no options: asked once, never right
        raise LayoutError(f"{where}: column 'answer' is {answer!r}; expected one of {', '.join(dict(options))}")
    for column in ("question", "category", "l2-category"):
        if missing(row[column]):
            raise LayoutError(f"{where}: column {column!r} is empty")
    hint = None if missing(row.get("hint")) else row["hint"]
    gap = tuple(letter for letter, _ in options) != LETTERS[: len(options)]
    fields = tuple((c, v if not missing(v) else "") for c, v in row.items() if c != "image" and c is not None)
    return MMBQuestion(index, row["question"], hint, options, answer, row["category"], row["l2-category"], image,
                       abnormal(options) or gap, fields, where)


def abnormal(options: Options) -> bool:
    """VLMEvalKit ``CIRCULAR.abnormal_entry`` (plus no options): an option naming two or more of the
    choice letters as words once everything but letters and spaces is blanked ("Both A and B"), or an
    option whose text is a run of capital letters (``text in string.ascii_uppercase``, as coded)."""
    if not options:
        return True
    letters = {letter for letter, _ in options}
    for _, text in options:
        words = "".join(c if c in string.ascii_letters or c == " " else " " for c in text).split()
        if len({w for w in words if w in letters}) > 1 or text in string.ascii_uppercase:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# CircularEval, prompt and extraction (pure)


def rotations(options: tuple[str, ...], answer: Optional[str]) -> list[tuple[tuple[str, ...], Optional[str]]]:
    """Pass i: letter j holds option (j + i) mod N; returns (option texts, right letter) per pass."""
    n = len(options)
    a = None if answer is None else LETTERS.index(answer)
    return [(options[i:] + options[:i], None if a is None else LETTERS[(a - i) % n]) for i in range(n)]


def build_prompt(question: str, hint: Optional[str], options: Options) -> str:
    lines = ([hint] if not missing(hint) else []) + [question]
    lines += [f"{letter}. {text}" for letter, text in options]
    return "\n".join(lines + [PROMPT_SUFFIX])


def passes(questions: list[MMBQuestion]) -> list[MMBPass]:
    """What is asked: each row once when the TSV already carries its circular copies, on the test split
    and for abnormal rows; otherwise every rotation of the row."""
    pre_expanded = any(q.index >= CIRCULAR_OFFSET for q in questions)
    test_split = all(q.answer is None for q in questions)
    out = []
    for q in questions:
        if pre_expanded or test_split or q.abnormal:
            group, rotation = q.index % CIRCULAR_OFFSET, q.index // CIRCULAR_OFFSET
            out.append(MMBPass(q, group, rotation, q.options, q.answer, build_prompt(q.question, q.hint, q.options)))
            continue
        for rotation, (texts, right) in enumerate(rotations(tuple(t for _, t in q.options), q.answer)):
            options = tuple(zip(LETTERS, texts))
            out.append(MMBPass(q, q.index, rotation, options, right, build_prompt(q.question, q.hint, options)))
    return out


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


def _infer_text(answer: str, options: Options) -> Optional[str]:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(text) for _, text in options):
        return None
    found = [letter for letter, text in options if text.lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_choice(response: str, options: Options) -> Optional[str]:
    """The chosen letter, "Z" for a refusal, or None when nothing can be read off the response."""
    if not options:
        return None
    return _infer_option(response, tuple(letter for letter, _ in options)) or _infer_text(response, options)


def _accuracy(hits: dict[int, bool], keys: dict[int, str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for index, hit in hits.items():
        groups[keys[index]].append(hit)
    return {k: ratio(sum(v), len(v)) for k, v in sorted(groups.items())}


def _chance(passes: list[tuple[MMBPass, Optional[str]]]) -> float:
    out = 1.0
    for p, _ in passes:
        out *= 1 / len(p.options) if p.options else 0.0
    return out


def score_mmbench(answered: Iterable[tuple[MMBPass, str]]) -> dict[str, Any]:
    groups: dict[int, list[tuple[MMBPass, Optional[str]]]] = defaultdict(list)
    for p, response in answered:
        groups[p.group].append((p, extract_choice(response, p.options)))
    hits = {g: all(pred == p.answer for p, pred in ps) for g, ps in groups.items()}
    first = [pred == p.answer for ps in groups.values() for p, pred in ps if p.rotation == 0]
    category = {g: ps[0][0].question.category for g, ps in groups.items()}
    l2 = {g: ps[0][0].question.l2_category for g, ps in groups.items()}
    preds = [pred for ps in groups.values() for _, pred in ps]
    return {
        "benchmark": "mmbench",
        "rule": "CircularEval; VLMEvalKit rule-based can_infer, exact matching (no LLM judge); unparsed = wrong",
        "questions": len(hits),
        "passes": len(preds),
        "asked_once": sum(len(ps) == 1 for ps in groups.values()),
        "overall": ratio(sum(hits.values()), len(hits)),
        # a uniform guess passes every one of a question's passes with probability prod(1 / options)
        "chance": ratio(sum(_chance(ps) for ps in groups.values()), len(groups)),
        "single_pass": ratio(sum(first), len(first)),  # rotation 0 only, for reference
        "l2_category": _accuracy(hits, l2),
        "category": _accuracy(hits, category),
        "unparsed": sum(p is None for p in preds),
        "unparsed_questions": sum(any(p is None for _, p in ps) for ps in groups.values()),
        "refused": sum(p == "Z" for p in preds),
    }


def markdown_mmbench(result: dict[str, Any]) -> str:
    if result.get("split") == "test":
        return (f"# MMBench (test split)\n\nAnswers are hidden: {result['passes']} rows answered; submit "
                f"`{result['submission']}` to the MMBench server.\n")
    parts = [
        "# MMBench (CircularEval)\n",
        f"**Overall: {pct(result['overall'])}%** over {result['questions']} questions "
        f"({result['passes']} passes, {result['asked_once']} questions asked once; single pass: {pct(result['single_pass'])}%)\n",
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


def _key(p: MMBPass) -> str:
    return f"{p.question.index}/{p.rotation}|{p.prompt}"


def answer_mmbench(answerer: Answerer, asked: list[MMBPass], results: Path, batch_size: int = 1) -> list[str]:
    """The response to every pass, in batches; ``results`` (JSONL: index, rotation, the prompt sent,
    the response, the letter read off it) is written as they come, and resumed from."""

    def ask(batch: list[MMBPass]) -> list[dict[str, Any]]:
        images: dict[int, Any] = {}  # a question's passes usually share a batch: decode its image once
        for p in batch:
            if p.question.index not in images:
                images[p.question.index] = open_image(base64.b64decode(p.question.image), f"{p.question.where} (column 'image')")
        responses = answerer.answer([images[p.question.index] for p in batch], [p.prompt for p in batch])
        return [{"index": p.question.index, "g_index": p.group, "rotation": p.rotation, "prompt": p.prompt, "options": dict(p.options),
                 "answer": p.answer, "response": r, "extracted": extract_choice(r, p.options)} for p, r in zip(batch, responses)]

    return [r["response"] for r in answer_all(asked, _key, ask, results, answerer.name, batch_size, "mmbench")]


def write_submission(path: Path, asked: list[MMBPass], responses: list[str]) -> Path:
    """LLaVA's ``convert_mmbench_for_submission.py`` layout, one row per TSV row (openpyxl, as it uses)."""
    from openpyxl import Workbook

    prediction = {p.question.index: r for p, r in zip(asked, responses)}
    columns = [c for c, _ in asked[0].question.fields if c not in SUBMISSION_DROPPED]
    columns.insert(6, "prediction")
    book = Workbook()
    sheet = book.active
    sheet.append(columns)
    for p in asked:
        values = dict(p.question.fields) | {"prediction": prediction[p.question.index], "index": p.question.index}
        sheet.append([values.get(c, "") for c in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def evaluate_mmbench(
    answerer: Answerer, data: str | Path, out_dir: str | Path, limit: int | None = None, batch_size: int = 1
) -> dict[str, Any]:
    questions = read_mmbench(data)[:limit]
    asked = passes(questions)
    out = Path(out_dir)
    responses = answer_mmbench(answerer, asked, out / "mmbench_answers.jsonl", batch_size)
    if all(p.answer is None for p in asked):
        submission = write_submission(out / SUBMISSION_FILE, asked, responses)
        result: dict[str, Any] = {"benchmark": "mmbench", "split": "test", "questions": len(questions),
                                  "passes": len(asked), "submission": str(submission)}
    else:
        result = score_mmbench(zip(asked, responses))
    result["data"] = str(data)
    write_result(out, "mmbench", result, markdown_mmbench(result))
    return result
