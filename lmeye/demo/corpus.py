"""A deterministic synthetic image-text corpus for the offline demo and the tests.

Every image is a few coloured shapes at named positions on a coloured background, so its caption
and its question/answer annotations are exactly true, and the whole corpus is regenerated
byte-for-byte from a seed: no network, no downloaded data set.

Each generated item also carries a ``jitter`` seed: its render lays a faint smooth random luminance
texture over the background, so that two items of the same scene (there are only ~1,400 one-shape
scenes) are distinct images, as natural photos are, and the curate stage's duplicate filters drop
only the planted copies (``lmeye.demo.planted``). A perceptual hash is colour-blind: without the
texture every red and every blue circle at the top left on white would hash alike. The shapes are
drawn where they always were: with the shapes also moved by up to 4% of the side and resized by up
to 10%, and a +-30 texture, the learning check's held-out exact match was 0.807 against 0.884 (shape
0.41 against 0.83); with a +-25 texture alone 0.820; with this one 0.902 (README, "Curation in the demo").

The corpus also carries *broken* entries so that the download stage meets every kind of failure it
must record as data: a file that is not an image, a truncated JPEG, a URL the server answers 404
and one it answers 500 (the last two have no file; `lmeye.demo.server` simulates them).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Far apart in RGB, so JPEG artefacts never make one colour look like another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

# Centre of each position as a fraction of the image side. The shapes are small enough that
# shapes at different positions never overlap.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}

MAX_OBJECTS = 3
JPEG_QUALITY = 90

# The per-item texture (``DemoItem.jitter``): TEXTURE_GRID x TEXTURE_GRID random levels in
# +-TEXTURE_AMPLITUDE, upsampled smoothly, added to the background; its mean over the background stays
# the background colour, so every annotation stays true. On the 3,000-image demo corpus as downloaded,
# the closest two distinct images are 4 phash bits apart with these (as with +-25 or +-30), while with
# a 4x4 grid several hundred fell within 4 bits, and without a texture half the corpus collided.
TEXTURE_GRID = 8
TEXTURE_AMPLITUDE = 12
TRUNCATE_FRACTION = 0.4

# Broken entry name -> (expected failure kind, caption). Captions look ordinary on purpose: the
# download stage must find the failure from the response, not from the caption.
BROKEN_ENTRIES: dict[str, tuple[str, str]] = {
    "not_an_image.jpg": ("not_an_image", "a red circle in the centre on a white background"),
    "missing.jpg": ("404", "a blue square at the top left on a yellow background"),
    "truncated.jpg": ("truncated", "a green triangle at the bottom right on a black background"),
    "server_error.jpg": ("500", "a purple star at the top right on an orange background"),
}

Object = tuple[str, str, str]  # (shape, colour, position)


@dataclass(frozen=True)
class DemoItem:
    """One synthetic image: its file name, caption, shapes and background colour."""

    name: str
    caption: str
    objects: tuple[Object, ...]
    background: str
    jitter: int | None = None  # seed of the render's background texture; None: a flat background



@dataclass
class DemoCorpus:
    """A corpus written to `root`: the good items and the broken entries (name -> failure kind)."""

    root: Path
    items: list[DemoItem]
    broken: dict[str, str] = field(default_factory=dict)

    def good_names(self) -> list[str]:
        return [item.name for item in self.items]

    def expected_failures(self) -> dict[str, str]:
        """Name -> the failure a downloader must record: "404", "500", "not_an_image", "truncated"."""
        return dict(self.broken)


# ---------------------------------------------------------------------------------------------
# Generation


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def where(position: str) -> str:
    """"at the top left", "in the centre": the preposition reads naturally in captions and questions."""
    return "in the centre" if position == "centre" else f"at the {position}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(objects: tuple[Object, ...], background: str, rng: random.Random) -> str:
    described = _join([f"{_article(c)} {c} {s} {where(p)}" for s, c, p in objects])
    bg = f"{_article(background)} {background} background"
    template = rng.choice(("{objs} on {bg}", "{bg} with {objs}", "{objs} against {bg}"))
    return template.format(objs=described, bg=bg)


def _random_item(index: int, rng: random.Random, max_objects: int = MAX_OBJECTS) -> DemoItem:
    count = rng.randint(1, max_objects)
    background, *palette = rng.sample(sorted(COLOURS), 1 + count)
    shape_colours = rng.choices(palette, k=count)  # shapes may share a colour, never the background's
    positions = rng.sample(sorted(POSITIONS), count)
    objects = tuple(
        (rng.choice(SHAPES), colour, position) for colour, position in zip(shape_colours, positions)
    )
    return DemoItem(
        name=f"img_{index:05d}.jpg",
        caption=_caption(objects, background, rng),
        objects=objects,
        background=background,
    )


def generate_items(num_images: int, seed: int = 0, max_objects: int = MAX_OBJECTS) -> list[DemoItem]:
    """`num_images` items of 1 to `max_objects` shapes, the same for the same arguments (one
    `random.Random(seed)` drives them all)."""
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects {max_objects}: between 1 and {len(POSITIONS)} (one shape per position)")
    rng = random.Random(seed)
    # The jitter seeds come from a second generator, so the scenes are the ones the seed always drew.
    jitter = random.Random(f"jitter:{seed}")
    return [dataclasses.replace(_random_item(i, rng, max_objects), jitter=jitter.getrandbits(32))
            for i in range(num_images)]


# ---------------------------------------------------------------------------------------------
# Rendering


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(colour: str, size: int, rng: random.Random | None) -> Image.Image:
    """The background colour, with a smooth random luminance texture when ``rng`` is given."""
    if rng is None:
        return Image.new("RGB", (size, size), COLOURS[colour])
    levels = bytes(128 + rng.randint(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE) for _ in range(TEXTURE_GRID ** 2))
    texture = Image.frombytes("L", (TEXTURE_GRID, TEXTURE_GRID), levels).resize((size, size), Image.BICUBIC)
    return Image.merge("RGB", [texture.point(lambda v, c=c: min(255, max(0, c + v - 128))) for c in COLOURS[colour]])


def render(item: DemoItem, size: int = 64) -> bytes:
    """The item as a `size`x`size` RGB JPEG; the same bytes for the same item and size."""
    image = _background(item.background, size, None if item.jitter is None else random.Random(item.jitter))
    draw = ImageDraw.Draw(image)
    radius = size * 0.14  # neighbouring positions are >= 0.35 * size apart, so no overlap
    for shape, colour, position in item.objects:
        fx, fy = POSITIONS[position]
        _draw_shape(draw, shape, fx * size, fy * size, radius, COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Annotations


def qa_pairs(item: DemoItem, with_facts: bool = False) -> list[dict[str, str]]:
    """Question/answer pairs about count, colour, shape and position that have exactly one answer.

    A question is skipped when it would be ambiguous: "What colour is the circle?" when there are
    two circles, or "Where is the red circle?" when there are two red circles. With ``with_facts``
    each pair also has a "fact": the phrase of the caption that answers it ("a red circle at the
    top left", "3 shapes"), which the demo LLM learns to read (``lmeye.model.demo``).
    """
    shapes = [s for s, _, _ in item.objects]
    kinds = [(c, s) for s, c, _ in item.objects]
    bg = f"{_article(item.background)} {item.background} background"
    pairs = [
        {"question": "How many shapes are in the image?", "answer": str(len(item.objects)), "fact": f"{len(item.objects)} shapes"},
        {"question": "What colour is the background?", "answer": item.background, "fact": bg},
    ]
    for shape, colour, position in item.objects:
        fact = f"{_article(colour)} {colour} {shape} {where(position)}"
        if shapes.count(shape) == 1:
            pairs.append({"question": f"What colour is the {shape}?", "answer": colour, "fact": fact})
        if kinds.count((colour, shape)) == 1:
            pairs.append({"question": f"Where is the {colour} {shape}?", "answer": position, "fact": fact})
        # Positions are distinct within an image, so these two are always unambiguous.
        pairs.append({"question": f"What shape is {where(position)}?", "answer": shape, "fact": fact})
        pairs.append({"question": f"What colour is the shape {where(position)}?", "answer": colour, "fact": fact})
    if not with_facts:
        for p in pairs:
            del p["fact"]
    return pairs


# ---------------------------------------------------------------------------------------------
# Writing and loading


def write_file(path: Path, data: bytes) -> None:
    """Write only when the content differs, so a rerun leaves files (and their mtimes) alone."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()


def _broken_files(image_size: int) -> dict[str, bytes]:
    # A real JPEG cut short. Rendered at least 128 px so the cut falls in the scan data: the file
    # still opens (its header is intact) and fails only on load, like a real interrupted download.
    source_item = DemoItem("truncated.jpg", "", (("circle", "red", "centre"),), "white")
    source = render(source_item, max(image_size, 128))
    return {
        "not_an_image.jpg": b"<html><body>This is not an image.</body></html>\n",
        "truncated.jpg": source[: int(len(source) * TRUNCATE_FRACTION)],
    }


def write_corpus(
    root: str | Path, num_images: int = 64, seed: int = 0, image_size: int = 64, max_objects: int = MAX_OBJECTS
) -> DemoCorpus:
    """Write the corpus under `root` and return it.

    Layout: `images/<name>` (good items and the on-disk broken entries), `captions.jsonl`
    ({"image", "caption"} per good item), `annotations.json` (VQA layout: a list of
    {"image", "question", "answer"}) and `corpus.json` (everything `load_corpus` needs).
    Idempotent: the same arguments give the same bytes, and unchanged files are not rewritten.
    """
    root = Path(root)
    items = generate_items(num_images, seed, max_objects)
    for item in items:
        write_file(root / "images" / item.name, render(item, image_size))
    for name, data in _broken_files(image_size).items():
        write_file(root / "images" / name, data)

    write_file(
        root / "captions.jsonl",
        _jsonl_bytes({"image": item.name, "caption": item.caption} for item in items),
    )
    annotations = [{"image": item.name, **qa} for item in items for qa in qa_pairs(item)]
    write_file(root / "annotations.json", _json_bytes(annotations))

    broken = {name: kind for name, (kind, _) in BROKEN_ENTRIES.items()}
    manifest = {
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
        "items": [
            {"name": i.name, "caption": i.caption, "objects": i.objects, "background": i.background, "jitter": i.jitter}
            for i in items
        ],
        "broken": broken,
    }
    write_file(root / "corpus.json", _json_bytes(manifest))
    return DemoCorpus(root=root, items=items, broken=broken)


def load_corpus(root: str | Path) -> DemoCorpus:
    """Rebuild the `DemoCorpus` that `write_corpus` wrote under `root`, without regenerating it."""
    root = Path(root)
    manifest = json.loads((root / "corpus.json").read_text())
    items = [
        DemoItem(
            name=entry["name"],
            caption=entry["caption"],
            objects=tuple(tuple(obj) for obj in entry["objects"]),
            background=entry["background"],
            jitter=entry.get("jitter"),
        )
        for entry in manifest["items"]
    ]
    return DemoCorpus(root=root, items=items, broken=dict(manifest["broken"]))


# ---------------------------------------------------------------------------------------------
# URL lists

URL_LIST_FORMATS = ("csv", "tsv", "jsonl", "parquet")


def _url(base_url: str, name: str, kind: str | None) -> str:
    # Every URL ends with "/<name>", so a consumer can map a row back to its entry.
    if kind == "500":
        return f"{base_url}/status/500/{name}"
    return f"{base_url}/images/{name}"


def _interleave(good: list[dict], broken: list[dict]) -> list[dict]:
    """Spread the broken rows evenly through the good ones (the k-th of m goes near k/(m+1))."""
    keyed = [((i, 1, 0), row) for i, row in enumerate(good)]
    m = len(broken)
    keyed += [(((k + 1) * len(good) // (m + 1), 0, k), row) for k, row in enumerate(broken)]
    return [row for _, row in sorted(keyed, key=lambda pair: pair[0])]


def write_url_list(
    corpus: DemoCorpus,
    base_url: str,
    path: str | Path,
    fmt: str = "csv",
    url_col: str = "url",
    caption_col: str = "caption",
    extra: Iterable[tuple[str, str]] = (),
) -> Path:
    """Write the URL list (good items with the broken entries spread among them) and return its path.

    `fmt` is one of csv, tsv, jsonl, parquet: the input formats img2dataset reads. `extra`: more
    (file name, caption) rows after the good items (the planted cases, ``lmeye.demo.planted``).
    """
    if fmt not in URL_LIST_FORMATS:
        raise ValueError(f"unknown URL list format {fmt!r}; expected one of {URL_LIST_FORMATS}")
    base_url = base_url.rstrip("/")
    good = [{url_col: _url(base_url, i.name, None), caption_col: i.caption} for i in corpus.items]
    good += [{url_col: _url(base_url, name, None), caption_col: caption} for name, caption in extra]
    broken = [
        {url_col: _url(base_url, name, kind), caption_col: BROKEN_ENTRIES[name][1]}
        for name, kind in corpus.broken.items()
    ]
    rows = _interleave(good, broken)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {col: [row[col] for row in rows] for col in (url_col, caption_col)}
        pq.write_table(pa.table(columns), path)
    elif fmt == "jsonl":
        path.write_bytes(_jsonl_bytes(rows))
    else:
        with path.open("w", newline="") as handle:
            delimiter = "\t" if fmt == "tsv" else ","
            writer = csv.DictWriter(handle, fieldnames=[url_col, caption_col], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    return path
