"""Caption tasks of the instruct stage: the templates file, and one task per caption.

Two kinds of task (``lmeye/templates/captions.yaml`` documents the file):

* a *caption* task (``short_caption``, ``detailed_description``) has ``prompts`` and
  ``responses``; a response restates the caption (``{caption}``, ``{caption_clause}``);
* a *grounded* task (``grounded_qa``) asks about one thing the caption states: the colour,
  position or count of an object, or the background colour. ``facts`` reads those out of the
  caption; the task has ``prompts``/``responses`` per fact kind, filled with ``{object}``,
  ``{objects}`` and ``{answer}``, so the answer is always taken from the caption. A caption that
  states none of them gets one of the source's caption tasks instead (or, with no caption task
  configured, is rejected as ``no_grounded_fact``).

Task, phrasing and fact are chosen by a seeded hash of uid and caption: the same on every run.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

import fsspec
import numpy as np
import yaml

from schemas.instructions import ROLE_ASSISTANT, ROLE_USER

FACT_KINDS = ("colour", "position", "count", "background")
CAPTION_PLACEHOLDERS = ("{caption}", "{caption_clause}")
FACT_PLACEHOLDERS = ("{object}", "{objects}", "{answer}")

COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown", "grey", "gray",
                "pink")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
POSITION_PHRASES = ("at the top left", "at the top right", "at the bottom left", "at the bottom right",
                    "in the centre", "in the center", "in the middle", "on the left", "on the right",
                    "at the top", "at the bottom", "in the foreground")
NOT_OBJECTS = {"background", "and", "with", "on", "in", "at", "of", "the", "a", "an"}

_COLOURS = "|".join(COLOUR_WORDS)
_OBJECT_RE = re.compile(rf"\b(?:a|an|the|one)\s+({_COLOURS})\s+([a-z]+)(?:\s+({'|'.join(POSITION_PHRASES)})\b)?")
_BACKGROUND_RE = re.compile(rf"\b({_COLOURS})\s+background\b")
_ANY_RE = re.compile(rf"\b(?:{_COLOURS}|{'|'.join(NUMBER_WORDS)}|\d+)\b")
_COUNT_RE = re.compile(rf"\b({'|'.join(NUMBER_WORDS)}|\d+)\s+([a-z]+s)\b")


class Fact(NamedTuple):
    kind: str  # one of FACT_KINDS
    object: str  # "circle", "red circle", "dogs"; "" for the background
    answer: str  # "red", "at the top left", "two"


def facts(caption: str) -> list[Fact]:
    """What the caption states about colours, positions, counts and the background, in caption
    order. A colour question is asked only about an object the caption gives one colour."""
    text = caption.lower()
    out: list[Fact] = []
    if not _ANY_RE.search(text):  # the common case on web captions: nothing to ask about
        return out
    colours: dict[str, set[str]] = {}
    objects = [(c, n, p) for c, n, p in _OBJECT_RE.findall(text) if n not in NOT_OBJECTS]
    for colour, noun, _ in objects:
        colours.setdefault(noun, set()).add(colour)
    for colour, noun, position in objects:
        if len(colours[noun]) == 1 and sum(n == noun for _, n, _ in objects) == 1:
            out.append(Fact("colour", noun, colour))
        if position:
            out.append(Fact("position", f"{colour} {noun}", position))
    for number, plural in _COUNT_RE.findall(text):
        out.append(Fact("count", plural, number))
    m = _BACKGROUND_RE.search(text)
    if m:
        out.append(Fact("background", "", m.group(1)))
    return out


@dataclass
class TaskTemplates:
    prompts: list[str]
    responses: list[str]


@dataclass
class GroundedTemplates:
    by_fact: dict[str, TaskTemplates]  # fact kind -> templates


def _phrasings(path: str, where: str, spec: object, placeholders: tuple[str, ...], required: tuple[str, ...]) -> TaskTemplates:
    if not isinstance(spec, dict) or set(spec) - {"prompts", "responses"}:
        raise ValueError(f"instruct.templates: {path}: {where}: expected exactly the keys prompts and responses")
    prompts, responses = spec.get("prompts"), spec.get("responses")
    for key, items in (("prompts", prompts), ("responses", responses)):
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise ValueError(f"instruct.templates: {path}: {where}.{key}: expected a non-empty list of strings")
    for key, items in (("prompts", prompts), ("responses", responses)):
        for r in items:
            rest = r
            for ph in placeholders:
                rest = rest.replace(ph, "")
            if key == "responses" and not any(ph in r for ph in required):
                raise ValueError(f"instruct.templates: {path}: {where}.responses: {r!r} uses neither "
                                 + " nor ".join(required))
            if "{" in rest or "}" in rest:
                raise ValueError(f"instruct.templates: {path}: {where}.{key}: {r!r}: unknown placeholder")
    return TaskTemplates([p.strip() for p in prompts], responses)


def load_templates(path: str, tasks: list[str]) -> dict[str, TaskTemplates | GroundedTemplates]:
    """Read and check the templates file; every task in ``tasks`` must be there."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"instruct.templates: {path}: no such file") from None
    except yaml.YAMLError as err:
        raise ValueError(f"instruct.templates: {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"instruct.templates: {path}: expected a mapping of task -> {{prompts, responses}}")
    out: dict[str, TaskTemplates | GroundedTemplates] = {}
    for task in tasks:
        spec = raw.get(task)
        if spec is None:
            raise ValueError(f"instruct.templates: {path}: no task '{task}' (has: {', '.join(map(str, raw))})")
        if isinstance(spec, dict) and spec and set(spec) <= set(FACT_KINDS):
            out[task] = GroundedTemplates({
                kind: _phrasings(path, f"{task}.{kind}", s, FACT_PLACEHOLDERS, ("{answer}",)) for kind, s in spec.items()
            })
        else:
            out[task] = _phrasings(path, task, spec, CAPTION_PLACEHOLDERS, CAPTION_PLACEHOLDERS)
    return out


def caption_clause(caption: str) -> str:
    """"A dog on a sofa." -> "a dog on a sofa" (acronyms such as "NASA ..." keep their case)."""
    c = caption.strip().rstrip(" .")
    first = c.split(" ", 1)[0]
    return c if len(first) > 1 and first.isupper() else c[:1].lower() + c[1:]


def fill(template: str, caption: str) -> str:
    if "{caption_clause}" in template:
        template = template.replace("{caption_clause}", caption_clause(caption))
    return template.replace("{caption}", caption)


def fill_fact(template: str, fact: Fact) -> str:
    text = template.replace("{object}", fact.object).replace("{objects}", fact.object).replace("{answer}", fact.answer)
    return text[:1].upper() + text[1:]


class CaptionTasks:
    """Chooses a task (by weight), a prompt and a response per caption, by a seeded hash."""

    def __init__(self, templates: dict, weights: dict[str, float], seed: int, task_label: Optional[str]):
        names = [t for t, w in weights.items() if w > 0]
        total = sum(weights[t] for t in names)
        self.cum = np.cumsum([weights[t] / total for t in names]).tolist()
        self.names = names
        self.tpl = [templates[t] for t in names]
        self.fallback = [i for i, t in enumerate(self.tpl) if isinstance(t, TaskTemplates)]
        self.seed = str(seed).encode() + b"\x00"
        self.label = task_label

    def make(self, uid: str, caption: str) -> Optional[tuple[str, list[tuple[str, str]]]]:
        """(task, turns), or None for a caption no configured task can use."""
        h = int.from_bytes(hashlib.blake2b(self.seed + (uid + caption).encode(), digest_size=8).digest(), "big")
        i = min(bisect.bisect_right(self.cum, (h >> 40) / 16777216.0), len(self.cum) - 1)
        t = self.tpl[i]
        if isinstance(t, GroundedTemplates):
            usable = [f for f in facts(caption) if f.kind in t.by_fact]
            if usable:
                fact = usable[(h >> 8) % len(usable)]
                ft = t.by_fact[fact.kind]
                prompt = fill_fact(ft.prompts[(h & 0xFFFFF) % len(ft.prompts)], fact)
                response = fill_fact(ft.responses[((h >> 20) & 0xFFFFF) % len(ft.responses)], fact)
                return self.label or self.names[i], [(ROLE_USER, prompt), (ROLE_ASSISTANT, response)]
            if not self.fallback:
                return None
            i = self.fallback[h % len(self.fallback)]
            t = self.tpl[i]
        prompt = t.prompts[(h & 0xFFFFF) % len(t.prompts)]
        response = fill(t.responses[((h >> 20) & 0xFFFFF) % len(t.responses)], caption)
        return self.label or self.names[i], [(ROLE_USER, prompt), (ROLE_ASSISTANT, response)]
