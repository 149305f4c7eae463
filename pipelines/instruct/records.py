"""Record parsers of the instruct stage, one per source kind.

A parser turns one decoded record into ``Parsed`` (an image reference, the turns, the record's
own id), a ``Reject`` (a record that is well-formed but unusable, counted by reason), or raises
``Malformed`` (not the expected shape: the config's ``on_bad_record`` decides whether that is
an error naming the file and the record, or a counted skip).

Released data is used as released: a LLaVA record without an ``image`` key is a text-only
conversation (``Parsed.image`` is ``TEXT_ONLY``), and a question/answer pair of a multi-turn
conversation that cannot be used (an empty reply or question) is dropped alone and counted
in ``Parsed.dropped``, the rest of the conversation kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from pipelines.instruct.jsonio import Malformed, read_json_source
from schemas.instructions import ROLE_ASSISTANT, ROLE_USER

# One or more <image> placeholders with the whitespace around them; replaced by one separator.
IMAGE_TOKEN_RE = re.compile(r"(?:\s*<image>)+\s*")
ROLE_MAP = {"human": ROLE_USER, "user": ROLE_USER, "gpt": ROLE_ASSISTANT, "assistant": ROLE_ASSISTANT}
TEXT_ONLY = None  # Parsed.image of a record without an image


@dataclass(frozen=True)
class Reject:
    reason: str


@dataclass
class Parsed:
    image: Any  # the image reference as the file has it (str or int); TEXT_ONLY for none
    turns: list[tuple[str, str]]  # (role, content), validated
    source_id: Optional[str] = None  # the record's own id, when it has one
    dropped: Counter = field(default_factory=Counter)  # turns left out, by reason


def strip_image_token(text: str) -> str:
    """Remove ``<image>`` placeholders without gluing words: ``Look at <image> and tell me`` ->
    ``Look at and tell me``; a placeholder on its own line takes its line break with it."""
    if "<image>" not in text:
        return text.strip()
    return IMAGE_TOKEN_RE.sub(lambda m: "\n" if "\n" in m.group() else " ", text).strip()


def _field(rec: Any, name: str, types: tuple[type, ...], what: str) -> Any:
    if not isinstance(rec, dict):
        raise Malformed(f"not a JSON object (got {type(rec).__name__})")
    if name not in rec:
        raise Malformed(f"missing '{name}' ({what})")
    value = rec[name]
    if value is not None and not isinstance(value, types):
        raise Malformed(f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    return value


def record_id(rec: Any, id_field: Optional[str]) -> Optional[str]:
    """The record's own id (a string or number under ``id_field``), else None."""
    if not id_field or not isinstance(rec, dict):
        return None
    value = rec.get(id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _image_ref(value: Any) -> Any:
    """A single image reference, or a Reject. Lists of one are unwrapped; ints stay ints."""
    if isinstance(value, list):
        if len(value) > 1:
            return Reject("multiple_images")
        value = value[0] if value else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return Reject("no_image")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"image reference must be a string or an integer, got {type(value).__name__}")
    return value.strip() if isinstance(value, str) else value


def _answer(value: Any, name: str) -> str:
    if isinstance(value, bool):
        raise Malformed(f"'{name}' must be a string, got bool")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # VQA v2 style: several annotators' answers, the most frequent wins
        answers = []
        for a in value:
            a = a.get("answer") if isinstance(a, dict) else a
            if isinstance(a, str) and a.strip():
                answers.append(a.strip())
        if not answers:
            return ""
        counts = Counter(answers)
        best = max(counts.values())
        return next(a for a in answers if counts[a] == best)
    raise Malformed(f"'{name}' must be a string or a list of answers, got {type(value).__name__}")


def usable_turns(turns: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Counter] | Reject:
    """The conversation rules. A record whose structure is wrong is rejected; in a well-formed
    one, a question/answer pair with an empty side is dropped alone (counted by reason), and
    the record is rejected only when no pair is left."""
    roles = [r for r, _ in turns]
    if ROLE_USER not in roles:
        return Reject("no_user_turn")
    if ROLE_ASSISTANT not in roles:
        return Reject("no_answer")
    if roles[0] != ROLE_USER or any(a == b for a, b in zip(roles, roles[1:])):
        return Reject("turns_not_alternating")
    if roles[-1] != ROLE_ASSISTANT:
        return Reject("unanswered_question")
    kept: list[tuple[str, str]] = []
    dropped: Counter = Counter()
    for q, a in zip(turns[0::2], turns[1::2]):
        if not a[1]:
            dropped["empty_answer"] += 1
        elif not q[1]:
            dropped["empty_question"] += 1
        else:
            kept += [q, a]
    if not kept:
        return Reject("empty_answer" if dropped["empty_answer"] else "empty_question")
    return kept, dropped


def parse_qa(rec: Any, image_field: str, question_field: str, answer_field: str, id_field: Optional[str] = None) -> Parsed | Reject:
    """VQA and LMEyeMID records: one question, one answer."""
    image = _field(rec, image_field, (str, int, list), "the image reference")
    question = _field(rec, question_field, (str,), "the question")
    answer = _field(rec, answer_field, (str, int, float, list), "the answer")
    ref = _image_ref(image)
    if isinstance(ref, Reject):
        return ref
    q = strip_image_token(question or "")
    a = _answer(answer, answer_field).strip() if answer is not None else ""
    if not a:
        return Reject("empty_answer")
    if not q:
        return Reject("empty_question")
    return Parsed(ref, [(ROLE_USER, q), (ROLE_ASSISTANT, a)], record_id(rec, id_field))


def parse_llava(rec: Any, image_field: str, conversations_field: str, id_field: Optional[str] = "id",
                text_only: bool = True) -> Parsed | Reject:
    """A LLaVA record. Without an ``image_field`` key it is text-only (``TEXT_ONLY``), or a
    ``no_image`` Reject when ``text_only`` is false."""
    convs = _field(rec, conversations_field, (list,), "the conversation")
    if convs is None:
        raise Malformed(f"'{conversations_field}' must be a list, got null")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise Malformed(f"{conversations_field}[{i}]: expected {{\"from\": str, \"value\": str}}")
        role = ROLE_MAP.get(turn["from"].strip().lower())
        if role is None:
            return Reject("unknown_role")
        turns.append((role, strip_image_token(turn["value"])))
    usable = usable_turns(turns)
    if isinstance(usable, Reject):
        return usable
    if image_field not in rec:
        ref = TEXT_ONLY if text_only else Reject("no_image")
    else:
        ref = _image_ref(rec[image_field])
    if isinstance(ref, Reject):
        return ref
    return Parsed(ref, usable[0], record_id(rec, id_field), usable[1])


def parse_caption_record(rec: Any, image_field: str, caption_field: str) -> tuple[Any, str] | Reject:
    image = _field(rec, image_field, (str, int, list), "the image reference")
    caption = _field(rec, caption_field, (str,), "the caption")
    ref = _image_ref(image)
    if isinstance(ref, Reject):
        return ref
    if not caption or not caption.strip():
        return Reject("no_caption")
    return ref, caption


# ---------------------------------------------------------------------------------------------
# VQAv2 as released: questions in one file, their answers in another


QUESTION_ID = "question_id"  # VQAv2's join key, in both files


def load_vqa_answers(path: str) -> dict[Any, str]:
    """question_id -> answer over a VQAv2 annotations file (``{"annotations": [...]}``): the
    annotation's ``multiple_choice_answer`` (VQAv2's most frequent of its ten answers), else the
    most frequent of its ``answers``. A bounded map: VQAv2 has about 1.1M questions in all."""
    answers: dict[Any, str] = {}
    for file, where, rec in read_json_source(path):
        if isinstance(rec, Malformed):
            raise Malformed(f"{file}: {where}: {rec}")
        try:
            qid = _field(rec, QUESTION_ID, (int, str), "the question it answers")
            if "multiple_choice_answer" in rec:
                answer = _answer(rec["multiple_choice_answer"], "multiple_choice_answer")
            else:
                answer = _answer(_field(rec, "answers", (list,), "the answers"), "answers")
        except Malformed as err:
            raise Malformed(f"{file}: {where}: {err}") from None
        answers[qid] = answer
    return answers


def with_vqa_answer(rec: Any, answers: dict[Any, str], answer_field: str) -> Any:
    """A VQAv2 question record with its answer under ``answer_field``, or a Reject when the
    annotations have none for it."""
    qid = _field(rec, QUESTION_ID, (int, str), "VQAv2's question id, to find its answer")
    if qid not in answers:
        return Reject("no_annotation")
    return {**rec, answer_field: answers[qid]}
