"""Cases planted in the demo corpus for the curate stage to find, and their truth.

Four kinds, each a file of its own under ``{corpus}/images/`` served beside the corpus:

* ``exact_duplicate``: a corpus image's bytes, with its caption;
* ``near_duplicate``: a corpus image re-encoded at a low JPEG quality, resized, or cropped by a pixel
  on every side (the download stage resizes it back to ``image_size``), with its caption;
* ``mismatched_caption``: a new render of a corpus scene (its own jitter, so not a duplicate) paired
  with another corpus image's caption, which describes a different scene;
* ``benchmark_copy``: a held-out benchmark image (``lmeye.demo.benchsets``), exact or re-encoded,
  with its own caption.

Each duplicate copies a different corpus image, so every planted group is one original and one copy.
The truth goes to ``{corpus}/planted.json``: file name (every URL ends with ``/<name>``) -> kind, the
``original`` it copies (a corpus file name, or a benchmark image's file name), and ``how``.
Everything is drawn from the seed, so a rerun writes the same files.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from lmeye.demo.corpus import DemoCorpus, DemoItem, JPEG_QUALITY, render, write_file

PLANTED_FILE = "planted.json"
EXACT, NEAR, MISMATCHED, BENCHMARK = "exact_duplicate", "near_duplicate", "mismatched_caption", "benchmark_copy"
KINDS = (EXACT, NEAR, MISMATCHED, BENCHMARK)
# How a near duplicate (and every other benchmark copy) is made, in turn. At 64 px a resize or a
# re-encode moves the perceptual hash 0-4 bits and a one-pixel crop up to ~8 (README, "Curation in the demo").
LOW_QUALITY = 40
VARIANTS = (f"jpeg quality {LOW_QUALITY}", "resized up 1.5x", "resized down 0.75x", "cropped 1 px")


@dataclass(frozen=True)
class Planted:
    name: str  # file name under images/
    caption: str
    kind: str  # one of KINDS
    original: str  # the corpus (or benchmark) file name it copies; for a mismatched caption, the caption's owner
    how: str


def _encode(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def variant(data: bytes, how: str) -> bytes:
    """``data`` (a JPEG) transformed as ``how`` (one of VARIANTS, or "exact")."""
    if how == "exact":
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    if how == VARIANTS[0]:
        return _encode(image, LOW_QUALITY)
    if how == VARIANTS[1]:
        return _encode(image.resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC))
    if how == VARIANTS[2]:
        return _encode(image.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC))
    if how == VARIANTS[3]:
        return _encode(image.crop((1, 1, w - 1, h - 1)))
    raise ValueError(f"unknown variant {how!r}; expected 'exact' or one of {VARIANTS}")


def plant(corpus: DemoCorpus, heldout: list[DemoItem], counts, image_size: int, seed: int) -> list[Planted]:
    """Write the planted files (``counts``: a ``demo.planted`` section) under ``corpus.root`` and their
    truth to ``planted.json``; returns them."""
    rng = random.Random(f"planted:{seed}")
    items = corpus.items
    copied = rng.sample(items, counts.exact_duplicates + counts.near_duplicates)
    out: list[tuple[Planted, bytes]] = []
    for i, item in enumerate(copied[: counts.exact_duplicates]):
        out.append((Planted(f"planted_exact_{i:04d}.jpg", item.caption, EXACT, item.name, "exact"), render(item, image_size)))
    for i, item in enumerate(copied[counts.exact_duplicates:]):
        how = VARIANTS[i % len(VARIANTS)]
        out.append((Planted(f"planted_near_{i:04d}.jpg", item.caption, NEAR, item.name, how),
                    variant(render(item, image_size), how)))
    for i in range(counts.mismatched_captions):
        scene, other = rng.sample(items, 2)
        while (other.objects, other.background) == (scene.objects, scene.background):
            other = rng.choice(items)
        fresh = DemoItem(f"planted_caption_{i:04d}.jpg", other.caption, scene.objects, scene.background, rng.getrandbits(32))
        out.append((Planted(fresh.name, other.caption, MISMATCHED, other.name, f"a new render of {scene.name}"),
                    render(fresh, image_size)))
    for i, item in enumerate(rng.sample(heldout, counts.benchmark_copies)):
        how = "exact" if i % 2 == 0 else VARIANTS[(i // 2) % len(VARIANTS)]
        out.append((Planted(f"planted_bench_{i:04d}.jpg", item.caption, BENCHMARK, item.name, how),
                    variant(render(item, image_size), how)))
    for p, data in out:
        write_file(corpus.root / "images" / p.name, data)
    planted = [p for p, _ in out]
    write_file(corpus.root / PLANTED_FILE, (json.dumps({p.name: asdict(p) for p in planted}, indent=1) + "\n").encode())
    return planted


def load_planted(root: str | Path) -> list[Planted]:
    """The planted cases ``plant`` wrote under ``root`` (none when it wrote no truth file)."""
    path = Path(root) / PLANTED_FILE
    if not path.is_file():
        return []
    return [Planted(**entry) for entry in json.loads(path.read_text()).values()]
