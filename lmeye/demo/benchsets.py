"""Small MME-, MMBench- and SEED-Bench-layout sets from held-out demo images.

The demo corpus knows every image's shapes, colours, positions and background, so questions about
them have exactly one answer. Each question has a *type* (count, background, shape, colour,
position); MMBench's ``category`` and SEED-Bench's dimension follow it, so the report can show
accuracy per type. The files are in each benchmark's released layout and read back by
``lmeye.eval`` exactly as the real benchmarks are.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lmeye.eval.seedbench import DIMENSIONS
from lmeye.demo.corpus import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, DemoItem, where, generate_items, render

QUESTION_TYPES = ("count", "background", "shape", "colour", "position")
# MMBench l2-category and SEED-Bench dimension id of each type.
L2_CATEGORY = {
    "count": "coarse_perception",
    "background": "coarse_perception",
    "shape": "finegrained_perception (instance-level)",
    "colour": "finegrained_perception (instance-level)",
    "position": "finegrained_perception (instance-level)",
}
# SEED-Bench DATASET.md: 3 is Instance Attributes (colour), 4 is Instance Location (position).
SEED_DIMENSION = {"background": 1, "shape": 2, "colour": 3, "position": 4, "count": 5}
MME_SUBTASKS = ("existence", "count", "position", "color")
COUNTS = tuple(str(n) for n in range(1, MAX_OBJECTS + 2))  # one more than possible, so there are 4 options


@dataclass(frozen=True)
class BenchSets:
    mme: Path  # MME root (pass to ``lmeye eval mme --data``)
    mmbench: Path  # the TSV
    seedbench: Path  # SEED-Bench.json (images in SEED-Bench-image/ beside it)


@dataclass(frozen=True)
class Question:
    type: str
    question: str
    answer: str
    options: tuple[str, str, str, str]  # shuffled, the answer among them


def heldout_items(num_images: int, seed: int, exclude: Iterable[DemoItem] = (), max_objects: int = MAX_OBJECTS) -> list[DemoItem]:
    """``num_images`` demo items from ``seed``, none drawing the same scene as an ``exclude``d (training) item,
    with 1 to ``max_objects`` shapes like the corpus (``demo.max_objects``).

    Named ``eval_<n>.jpg`` so they never collide with corpus file names.
    """
    seen = {(i.objects, i.background) for i in exclude}
    items, drawn = [], 0
    while len(items) < num_images:
        batch = generate_items(drawn + 4 * num_images, seed, max_objects)[drawn:]
        drawn += len(batch)
        for item in batch:
            if (item.objects, item.background) not in seen and len(items) < num_images:
                seen.add((item.objects, item.background))
                items.append(dataclasses.replace(item, name=f"eval_{len(items):05d}.jpg"))
    return items


# ---------------------------------------------------------------------------------------------
# Questions


def _options(answer: str, vocabulary: Iterable[str], rng: random.Random) -> tuple[str, str, str, str]:
    distractors = rng.sample(sorted(set(vocabulary) - {answer}), 3)
    options = [answer, *distractors]
    rng.shuffle(options)
    return tuple(options)


def multiple_choice(item: DemoItem, rng: random.Random) -> list[Question]:
    """One question of each type about ``item``, each with four options and exactly one right."""
    shape, colour, position = item.objects[0]
    kinds = [(c, s) for s, c, _ in item.objects]
    # The colour question asks about another object when there is one, so types differ in target.
    c_shape, c_colour, c_position = item.objects[-1]
    asked = [
        ("count", "How many shapes are in the image?", str(len(item.objects)), COUNTS),
        ("background", "What colour is the background?", item.background, COLOURS),
        ("shape", f"What shape is {where(position)}?", shape, SHAPES),
        ("colour", f"What colour is the shape {where(c_position)}?", c_colour, COLOURS),
    ]
    if kinds.count((colour, shape)) == 1:
        asked.append(("position", f"Where is the {colour} {shape}?", position, POSITIONS))
    return [Question(t, q, a, _options(a, vocab, rng)) for t, q, a, vocab in asked]


def yes_no(item: DemoItem, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """MME subtask -> its two (question, Yes|No) pairs about ``item``: the corpus's question asked about
    its own answer ("Yes") and about another answer of the same type ("No"), in the yes/no form the
    instruct stage's ``yes_no`` format trains (``pipelines.instruct.formats.yes_no_question``)."""
    from pipelines.instruct.formats import yes_no_question

    shape, _, position = item.objects[0]
    c_shape, c_colour, c_position = item.objects[-1]
    kinds = [(c, s) for s, c, _ in item.objects]
    unique = [(s, c, p) for s, c, p in item.objects if kinds.count((c, s)) == 1]
    asked = {
        "existence": (f"What shape is {where(position)}?", shape, SHAPES),
        "count": ("How many shapes are in the image?", str(len(item.objects)), COUNTS[:-1]),
        "color": (f"What colour is the shape {where(c_position)}?", c_colour, COLOURS),
    }
    if unique:
        u_shape, u_colour, u_position = unique[0]
        asked["position"] = (f"Where is the {u_colour} {u_shape}?", u_position, POSITIONS)
    else:  # every shape has a twin: no "where is" question has one answer; ask what is where instead
        asked["position"] = (f"What shape is {where(c_position)}?", c_shape, SHAPES)
    out = {}
    for name, (question, answer, vocabulary) in asked.items():
        other = rng.choice(sorted(set(vocabulary) - {answer}))
        out[name] = [(yes_no_question(question, answer), "Yes"), (yes_no_question(question, other), "No")]
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def write_mme(root: Path, items: list[DemoItem], images: dict[str, bytes], seed: int) -> Path:
    """Flat layout (as MME's perception subtasks ship): ``<subtask>/<stem>.jpg`` beside ``<stem>.txt``."""
    rng = random.Random(seed)
    for item in items:
        stem = Path(item.name).stem
        for subtask, qa in yes_no(item, rng).items():
            folder = root / subtask
            folder.mkdir(parents=True, exist_ok=True)
            (folder / item.name).write_bytes(images[item.name])
            (folder / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa), encoding="utf-8")
    return root


def write_mmbench(path: Path, items: list[DemoItem], images: dict[str, bytes], seed: int) -> Path:
    """The MMBench dev TSV columns; each image is stored once, later rows refer to it by index."""
    rng = random.Random(seed)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "source", "split", "image"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        index = 0
        for item in items:
            first = index
            for q in multiple_choice(item, rng):
                image = base64.b64encode(images[item.name]).decode() if index == first else str(first)
                letter = "ABCD"[q.options.index(q.answer)]
                writer.writerow([index, q.question, "nan", *q.options, letter, q.type, L2_CATEGORY[q.type], "lingcloud-demo", "dev", image])
                index += 1
    return path


def write_seedbench(path: Path, items: list[DemoItem], images: dict[str, bytes], seed: int) -> Path:
    """``SEED-Bench.json`` with the images under ``SEED-Bench-image/`` beside it."""
    rng = random.Random(seed)
    image_dir = path.parent / "SEED-Bench-image"
    image_dir.mkdir(parents=True, exist_ok=True)
    questions = []
    for item in items:
        (image_dir / item.name).write_bytes(images[item.name])
        for q in multiple_choice(item, rng):
            questions.append({
                "answer": "ABCD"[q.options.index(q.answer)],
                **{f"choice_{k}": text for k, text in zip("abcd", q.options)},
                "data_id": item.name,
                "data_type": "image",
                "question": q.question,
                "question_id": f"{Path(item.name).stem}_{q.type}",
                "question_type_id": SEED_DIMENSION[q.type],
            })
    doc = {"questions": questions, "question_type": {DIMENSIONS[i]: i for i in sorted(SEED_DIMENSION.values())}}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def write_benchsets(root: str | Path, items: list[DemoItem], image_size: int = 64, seed: int = 0) -> BenchSets:
    """Write the three sets under ``root`` (``mme/``, ``mmbench/mmbench_demo.tsv``, ``seedbench/``)."""
    root = Path(root)
    images = {item.name: render(item, image_size) for item in items}
    return BenchSets(
        mme=write_mme(root / "mme", items, images, seed),
        mmbench=write_mmbench(root / "mmbench" / "mmbench_demo.tsv", items, images, seed),
        seedbench=write_seedbench(root / "seedbench" / "SEED-Bench.json", items, images, seed),
    )


def accuracy_by_type(seed_result: dict) -> dict[str, float]:
    """Question type -> accuracy, read off a SEED-Bench result of these sets (its dimensions are the types)."""
    by_id = {i: t for t, i in SEED_DIMENSION.items()}
    return {by_id[d["id"]]: d["accuracy"] for d in seed_result["dimensions"].values() if d["id"] in by_id}
