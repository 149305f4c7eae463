"""The demo corpus's planted cases: distinct images stay distinct, and the curate stage finds what was planted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from lingcloud_testing import curate_pairs_row, write_curate_tables
from PIL import Image

from lmeye.config import ConfigError, load_config
from lmeye.demo.benchsets import heldout_items, write_benchsets
from lmeye.demo.corpus import COLOURS, POSITIONS, generate_items, render, write_corpus
from lmeye.demo.curation_check import score_curation, summary_line
from lmeye.demo.planted import BENCHMARK, EXACT, MISMATCHED, NEAR, PLANTED_FILE, VARIANTS, Planted, load_planted, plant
from lmeye.tables import TableReader
from pipelines.curate import run as curate
from pipelines.curate.scores import hash_ints, phash_hex
from schemas.curation import CLIP_SCORE, CONTAMINATED, CURATION, DUPLICATE

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo.yaml"
COUNTS = {"demo.eval_images": 8, "demo.planted.exact_duplicates": 6, "demo.planted.near_duplicates": 12,
          "demo.planted.mismatched_captions": 5, "demo.planted.benchmark_copies": 8}


def downloaded(data: bytes, size: int = 64) -> bytes:
    """What the download stage stores: the image at ``size`` px (img2dataset's border resize), re-encoded."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _nearest_colour(pixel) -> str:
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], pixel)))


def test_jitter_keeps_every_annotation_true():
    """The jittered render still shows each shape's colour at its named position and the background colour
    (within the texture) in the corners; and it changes nothing the annotations say."""
    items = generate_items(300, seed=1)
    assert [(i.objects, i.background, i.caption) for i in items] == [
        (i.objects, i.background, i.caption) for i in generate_items(300, seed=1)]
    assert len({i.jitter for i in items}) == len(items)
    for item in items:
        image = Image.open(io.BytesIO(render(item, 64))).convert("RGB")
        # the border (no position reaches it): its mean is the background colour; single pixels vary with
        # the texture (an orange pixel may brighten towards yellow)
        pixels = np.asarray(image, np.float32)
        ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                               pixels[2:-2, :2].reshape(-1, 3), pixels[2:-2, -2:].reshape(-1, 3)])
        assert _nearest_colour(ring.mean(0)) == item.background, item
        for shape, colour, position in item.objects:
            if shape == "star":  # a star's centre is small; its arms reach the cell anyway
                continue
            fx, fy = POSITIONS[position]
            assert _nearest_colour(image.getpixel((int(fx * 64), int(fy * 64)))) == colour, (item, shape)


def test_no_two_demo_corpus_images_are_duplicates_under_the_demo_thresholds():
    """make demo's own corpus (configs/demo.yaml, all of it: near pairs grow with the square of its size), as
    downloaded: no two distinct images within the curate stage's phash distance, no two with the same bytes.
    Without the jitter ~1,400 scenes made 3,000 images and about half were true duplicates."""
    cfg = load_config(DEMO, {})
    d = cfg.demo
    images = [downloaded(render(item, d.image_size)) for item in generate_items(d.num_images, d.seed, d.max_objects)]
    assert len(set(images)) == len(images)
    h = hash_ints([phash_hex(b) for b in images])
    bits = np.bitwise_count(np.bitwise_xor(h[:, None], h[None, :])).astype(int)
    np.fill_diagonal(bits, 64)
    assert bits.min() > cfg.curate.phash_max_distance
    assert bits.min() > cfg.curate.decontam_phash_max_distance


@pytest.fixture
def demo_like(tmp_path):
    """A small demo corpus with planted cases of every kind, its held-out benchmark sets, and the truth."""
    corpus = write_corpus(tmp_path / "corpus", num_images=300, seed=0, image_size=64, max_objects=1)
    heldout = heldout_items(8, 0, exclude=corpus.items, max_objects=1)
    sets = write_benchsets(tmp_path / "benchsets", heldout, 64, 0)
    planted = plant(corpus, heldout, load_config(None, COUNTS).demo.planted, 64, 0)
    return corpus, heldout, sets, planted


def test_planted_cases_and_their_truth(demo_like, tmp_path):
    corpus, heldout, _, planted = demo_like
    by_name = {i.name: i for i in corpus.items}
    kinds = {k: [p for p in planted if p.kind == k] for k in (EXACT, NEAR, MISMATCHED, BENCHMARK)}
    assert {k: len(v) for k, v in kinds.items()} == {EXACT: 6, NEAR: 12, MISMATCHED: 5, BENCHMARK: 8}
    images = corpus.root / "images"
    for p in kinds[EXACT]:
        assert (images / p.name).read_bytes() == render(by_name[p.original], 64)
        assert p.caption == by_name[p.original].caption
    assert {p.how for p in kinds[NEAR]} == set(VARIANTS)
    for p in kinds[NEAR]:
        assert (images / p.name).read_bytes() != render(by_name[p.original], 64)
    assert len({p.original for p in kinds[EXACT] + kinds[NEAR]}) == 18  # every copy copies a different image
    for p in kinds[MISMATCHED]:
        scene = by_name[p.how.rsplit(" ", 1)[1]]
        assert p.caption == by_name[p.original].caption != scene.caption
        assert (by_name[p.original].objects, by_name[p.original].background) != (scene.objects, scene.background)
    assert {p.original for p in kinds[BENCHMARK]} == {i.name for i in heldout}
    truth = json.loads((corpus.root / PLANTED_FILE).read_text())
    assert truth["planted_exact_0000.jpg"]["kind"] == EXACT and load_planted(corpus.root) == planted
    again = plant(corpus, heldout, load_config(None, COUNTS).demo.planted, 64, 0)
    assert again == planted  # the same seed plants the same cases


def test_planted_counts_are_checked_at_load():
    with pytest.raises(ConfigError, match="benchmark_copies"):
        load_config(None, {"demo.eval_images": 4, "demo.planted.benchmark_copies": 5})
    with pytest.raises(ConfigError, match="num_images"):
        load_config(None, {"demo.num_images": 10, "demo.planted.exact_duplicates": 6, "demo.planted.near_duplicates": 5})
    with pytest.raises(ConfigError, match="planted.exact_duplicates"):
        load_config(None, {"demo.planted.exact_duplicates": -1})


def test_curate_with_the_demo_thresholds_finds_the_planted_cases(demo_like, tmp_path, ray_local):
    """The curate stage with configs/demo.yaml's curate section, on the images as downloaded: the planted
    duplicate pairs, benchmark copies and mismatched captions found, nothing else removed. The embeddings
    stand in for the CLIP's: unrelated per image but alike for a copy and its original, and a caption's is
    its owner image's, so a mismatched caption scores like an unrelated image (the head-aligned demo CLIP
    itself: test_clip_heads, test_demo)."""
    corpus, _, sets, planted = demo_like
    names = [i.name for i in corpus.items] + [p.name for p in planted]
    captions = {i.name: i.caption for i in corpus.items} | {p.name: p.caption for p in planted}
    rows = [curate_pairs_row(n, downloaded((corpus.root / "images" / n).read_bytes()), captions[n]) for n in names]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(rows), 64))  # unrelated images, unrelated embeddings
    index = {n: k for k, n in enumerate(names)}
    for p in planted:  # a copy's embedding is its original's, nearly (as the demo CLIP's: cosine >= 0.97)
        if p.kind in (EXACT, NEAR):
            emb[index[p.name]] = emb[index[p.original]] + 0.1 * rng.normal(size=64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    owner = {p.name: p.original for p in planted if p.kind == MISMATCHED}  # whose caption it carries
    text = emb[[index[owner.get(n, n)] for n in names]]
    pairs, features = write_curate_tables(tmp_path, rows, emb, text, shards=3)
    cfg = load_config(DEMO, {"data.root": str(tmp_path), "curate.pairs": str(pairs), "curate.features": str(features),
                             "curate.benchmarks": [str(sets.mme), str(sets.mmbench), str(sets.seedbench)], "ray.num_cpus": 2})
    summary = curate(cfg)
    assert summary.ok, summary.render()
    table = TableReader(cfg.curate.output, CURATION).read()
    scores = {s.filter: s for s in score_curation(table, pa.Table.from_pylist(rows).select(["uid", "url"]), planted)}
    assert set(scores) == {DUPLICATE, CONTAMINATED, CLIP_SCORE}
    dup, bench, clip = scores[DUPLICATE], scores[CONTAMINATED], scores[CLIP_SCORE]
    # Nothing un-planted removed and every exact copy found. A one-pixel crop or a low-quality re-encode can
    # move a 64 px image's phash past the demo's 3 bits (which keep distinct corpus images apart, above):
    # here every case is found, in make demo's corpus a few are not (README)
    assert dup.planted == 18 and dup.removed == dup.found and dup.precision == 1.0 and dup.recall >= 0.75
    assert dup.by_how["exact"] == (6, 6) and set(dup.by_how) == {"exact", *VARIANTS}
    assert bench.planted == 8 and bench.removed == bench.found and bench.precision == 1.0 and bench.recall >= 0.75
    assert bench.by_how["exact"] == (4, 4)
    assert (clip.removed, clip.planted, clip.found, clip.precision, clip.recall) == (5, 5, 5, 1.0, 1.0)
    dropped = dup.removed + bench.removed + clip.removed
    assert summary.counts == {"kept": len(rows) - dropped, "dropped": dropped}
    assert summary_line(list(scores.values())) == (
        f"clip_score P 1.000 R 1.000 (5/5); contaminated P 1.000 R {bench.recall:.3f} ({bench.found}/8); "
        f"duplicate P 1.000 R {dup.recall:.3f} ({dup.found}/18)")


def test_score_curation_counts_a_pair_found_from_either_side_and_false_drops():
    planted = [
        _p("copy_a.jpg", EXACT, "a.jpg"), _p("copy_b.jpg", NEAR, "b.jpg", VARIANTS[0]), _p("copy_c.jpg", NEAR, "c.jpg", VARIANTS[1]),
        _p("leak.jpg", BENCHMARK, "eval_00000.jpg"), _p("wrong.jpg", MISMATCHED, "a.jpg", "a new render of b.jpg"),
    ]
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "copy_a.jpg", "copy_b.jpg", "copy_c.jpg", "leak.jpg", "wrong.jpg", "x.jpg"]
    pairs = pa.table({"uid": [f"u_{n}" for n in names], "url": [f"http://h/images/{n}" for n in names]})
    verdicts = {  # uid -> (reasons, duplicate_of)
        "copy_a.jpg": ([DUPLICATE], "a.jpg"),  # the copy dropped
        "b.jpg": ([DUPLICATE], "copy_b.jpg"),  # the original dropped, its copy kept: found all the same
        "e.jpg": ([DUPLICATE], "d.jpg"),  # two distinct images: a false drop
        "leak.jpg": ([CONTAMINATED], None),
        "x.jpg": (["not_downloaded"], None),
    }
    curation = pa.table({
        "uid": [f"u_{n}" for n in names],
        "reasons": [verdicts.get(n, ([], None))[0] for n in names],
        "duplicate_of": [None if verdicts.get(n, ([], None))[1] is None else f"u_{verdicts[n][1]}" for n in names],
    })
    scores = {s.filter: s for s in score_curation(curation, pairs, planted)}
    dup = scores[DUPLICATE]
    assert (dup.removed, dup.planted, dup.found) == (3, 3, 2)
    assert dup.precision == pytest.approx(2 / 3) and dup.recall == pytest.approx(2 / 3)
    assert dup.by_how == {"exact": (1, 1), VARIANTS[0]: (1, 1), VARIANTS[1]: (0, 1)}
    assert (scores[CONTAMINATED].precision, scores[CONTAMINATED].recall) == (1.0, 1.0)
    assert (scores[CLIP_SCORE].removed, scores[CLIP_SCORE].recall) == (0, 0.0)
    assert (scores["not_downloaded"].removed, scores["not_downloaded"].precision, scores["not_downloaded"].recall) == (1, None, None)


def _p(name, kind, original, how="exact"):
    return Planted(name=name, caption="c", kind=kind, original=original, how=how)
