"""Answer formats: a VQA source's question/answer pairs asked as the benchmarks ask them, as
LLaVA-1.5's training mix does (``instruct.sources[].formats``, per source).

* ``plain``: the question as it is, the answer as it is (the default: nothing changes);
* ``short``: ``question + "\\nAnswer the question using a single word or phrase."`` (VQAv2/GQA in
  LLaVA-1.5), the answer as it is;
* ``yes_no``: ``question + " Is the answer <candidate>? Please answer yes or no."`` (MME's and
  POPE's closing sentence): half of the records (seeded) name their own answer ("Yes"), the other
  half another answer of the same question type ("No"), so the negatives are balanced;
* ``multiple_choice``: the question with up to ``distractors + 1`` options, the distractors drawn
  from the same question type's answers, in MMBench's prompt (``lmeye.eval.mmbench.build_prompt``:
  ``A. ...`` lines and ``"Answer with the option's letter from the given choices directly."``); the
  answer is the letter;
* ``multiple_choice_text``: the same prompt, answered with the right option's text. VLMEvalKit reads
  such a reply as that option (``can_infer_text``; ``lmeye.eval.mmbench.extract_choice``), as it does for
  the many released models that answer so. It is for an LLM that cannot point at a letter: the demo's
  2+2-layer T5 never learned to (0.20-0.28 in 1,000-4,000 steps, chance 0.25; also with a reply
  "<text> (<letter>)", where the text was always right and the letter always "A"), yet it reads the
  option's text from the ``<img-d>`` slots as it reads a plain answer.

A question's *type* is its first ``type_words`` words, lower-cased (VQAv2's ``question_type`` is such a
prefix: "what color is", "how many"). The answers of each type come from a first pass over the
source (``AnswerPool``); a count (an answer of digits) whose type has no other answer contrasts with
the counts next to it. Any other record whose type has no other answer is asked ``short`` instead. Each
record gets one format, chosen by a seeded hash of its position in its file (deterministic), and the
``task`` column names it (``<task>_yes_no``, ``<task>_multiple_choice`` for both multiple-choice replies; ``plain`` and ``short`` keep
the source's task), so training stages and checks can pick formats.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from typing import Iterable, Optional

from lmeye.eval.mmbench import LETTERS, build_prompt

SHORT = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."
FORMATS = ("plain", "short", "yes_no", "multiple_choice", "multiple_choice_text")
NEEDS_POOL = ("yes_no", "multiple_choice", "multiple_choice_text")
_WORD = re.compile(r"[a-z0-9']+")


def question_type(question: str, words: int) -> str:
    return " ".join(_WORD.findall(question.lower())[:words])


def yes_no_question(question: str, candidate: str) -> str:
    """The yes/no form of a question about ``candidate`` (the demo's MME-layout set asks the same)."""
    return f"{question} Is the answer {candidate}? {YES_NO}"


class AnswerPool:
    """Question type -> its distinct answers, most frequent first (at most ``limit`` per type)."""

    def __init__(self, pairs: Iterable[tuple[str, str]], words: int, limit: int = 1000):
        counts: dict[str, Counter] = defaultdict(Counter)
        for question, answer in pairs:
            counts[question_type(question, words)][answer] += 1
        self.words = words
        self.answers = {t: [a for a, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]] for t, c in counts.items()}

    def others(self, question: str, answer: str) -> list[str]:
        """The type's other answers; for a count whose type has none, the counts next to it.

        A corpus whose images all hold one shape answers "How many ...?" with "1" alone, yet a count
        contrasts with any other count: "Is the answer 2?" has the answer "No" whatever the pool saw.
        Without this the count is never asked yes/no there, and MME's count subtask ("Is the answer 2?")
        asks what training never did (the demo answered 10-26 of its 48)."""
        key = answer.strip().lower()
        found = [a for a in self.answers.get(question_type(question, self.words), []) if a.strip().lower() != key]
        if found or not (key.isascii() and key.isdigit()):  # "2", not "²" (isdigit, yet int() refuses it)
            return found
        n = int(key)
        return [str(m) for m in (n + 1, n + 2, n - 1) if m >= 0]


class Formatter:
    """One source's formats: ``apply`` turns a (question, answer) pair into (task, turns)."""

    def __init__(self, weights: dict[str, float], pool: Optional[AnswerPool], seed: int, name: str, distractors: int = 3):
        self.names = [f for f, w in weights.items() if w > 0]
        self.cumulative, total = [], 0.0
        for f in self.names:
            total += weights[f]
            self.cumulative.append(total)
        self.pool, self.salt, self.distractors = pool, f"{seed}\x00{name}\x00", distractors

    def _rng(self, position: str) -> random.Random:
        digest = hashlib.blake2b((self.salt + position).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def apply(self, question: str, answer: str, task: str, position: str, roles: tuple[str, str]) -> tuple[str, list[tuple[str, str]]]:
        rng = self._rng(position)
        x = rng.random() * self.cumulative[-1]
        fmt = next(f for f, c in zip(self.names, self.cumulative) if x < c)
        others = self.pool.others(question, answer) if fmt in NEEDS_POOL and self.pool is not None else []
        if fmt in NEEDS_POOL and not others:
            fmt = "short"  # no other answer of this type: nothing to contrast with
        user, assistant = roles
        if fmt == "plain":
            return task, [(user, question), (assistant, answer)]
        if fmt == "short":
            return task, [(user, f"{question}\n{SHORT}"), (assistant, answer)]
        if fmt == "yes_no":
            if rng.random() < 0.5:
                return f"{task}_yes_no", [(user, yes_no_question(question, answer)), (assistant, "Yes")]
            return f"{task}_yes_no", [(user, yes_no_question(question, rng.choice(others))), (assistant, "No")]
        options = [answer] + rng.sample(others, min(self.distractors, len(others)))
        rng.shuffle(options)
        prompt = build_prompt(question, None, tuple(zip(LETTERS, options)))
        reply = answer if fmt == "multiple_choice_text" else LETTERS[options.index(answer)]
        return f"{task}_multiple_choice", [(user, prompt), (assistant, reply)]
