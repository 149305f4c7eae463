"""The curate stage on planted data: every filter, duplicates, decontamination, and the downstream keep-list."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lmeye.config import ConfigError, load_config
from lmeye.demo.corpus import generate_items, render
from lmeye.errors import UserError
from lmeye.eval.common import LayoutError
from lingcloud_testing import curate_pairs_row as _row, write_curate_tables as write_tables
from lmeye.tables import TableReader, TableWriter
from pipelines.curate import run
from pipelines.curate import scores, semdedup
from schemas.curation import (
    ASPECT_RATIO, CAPTION_LENGTH, CLIP_SCORE, CONTAMINATED, CURATION, DUPLICATE, NOT_DOWNLOADED, TOO_SMALL, UNSAFE,
    WATERMARK,
)
from schemas.features import FEATURES, TEXT_EMBEDDING
from schemas.pairs import SUCCESS

DIM = 16


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def curate(tmp_path: Path, pairs: Path, features: Path, **settings):
    overrides = {"data.root": str(tmp_path), "curate.pairs": str(pairs), "curate.features": str(features),
                 "curate.output": str(tmp_path / "curation"), "ray.num_cpus": 2}
    overrides.update({f"curate.{k}": v for k, v in settings.items()})
    summary = run(load_config(None, overrides))
    assert summary.ok, summary.render()
    table = TableReader(str(tmp_path / "curation"), CURATION).read()
    return summary, {r["uid"]: r for r in table.to_pylist()}


@pytest.fixture
def images():
    items = generate_items(12, seed=3)
    return [render(it, size=256) for it in items]  # phash needs some pixels: at 64 px a resize moves it 18 bits


def _with_cosine(image: np.ndarray, cos: list[float], rng: np.random.Generator) -> np.ndarray:
    """Caption embeddings whose cosine with each image embedding is exactly ``cos``."""
    u = rng.normal(size=image.shape)
    u -= (u * image).sum(1, keepdims=True) * image
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.asarray(cos)[:, None]
    return c * image + np.sqrt(1 - c ** 2) * u


def test_metadata_filters_and_clip_score_floor(tmp_path, images, ray_local):
    rng = np.random.default_rng(0)
    rows = [
        _row("good.jpg", images[0], punsafe=0.1, pwatermark=0.1),
        _row("unsafe.jpg", images[1], punsafe=0.9, pwatermark=0.1),
        _row("watermark.jpg", images[2], punsafe=0.1, pwatermark=0.95),
        _row("small.jpg", images[3], size=(20, 20), punsafe=None, pwatermark=None),
        _row("wide.jpg", images[4], size=(300, 64), punsafe=0.0, pwatermark=0.0),
        _row("short.jpg", images[5], caption="hi", punsafe=0.0, pwatermark=0.0),
        _row("missing.jpg", None, punsafe=0.0, pwatermark=0.0),
        _row("mismatched.jpg", images[6], punsafe=0.0, pwatermark=0.0),
        _row("ok2.jpg", images[7], punsafe=0.0, pwatermark=0.0),
    ]
    emb = _unit(rng, len(rows))
    cos = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.29]
    pairs, features = write_tables(tmp_path, rows, emb, _with_cosine(emb, cos, rng), extra=("punsafe", "pwatermark"))
    summary, got = curate(tmp_path, pairs, features, max_punsafe=0.5, max_pwatermark=0.5, min_size=32,
                          max_aspect_ratio=3.0, min_caption_words=3, min_clip_score=0.28, dedup=False)
    want = {"good.jpg": [], "unsafe.jpg": [UNSAFE], "watermark.jpg": [WATERMARK], "small.jpg": [TOO_SMALL],
            "wide.jpg": [ASPECT_RATIO], "short.jpg": [CAPTION_LENGTH], "missing.jpg": [NOT_DOWNLOADED],
            "mismatched.jpg": [CLIP_SCORE], "ok2.jpg": []}
    by_name = {r["url"].rsplit("/", 1)[1]: got[r["uid"]] for r in rows}
    assert {n: r["reasons"] for n, r in by_name.items()} == want
    assert {n for n, r in by_name.items() if r["keep"]} == {"good.jpg", "ok2.jpg"}
    assert by_name["good.jpg"]["clip_score"] == pytest.approx(0.5, abs=1e-4)
    assert by_name["mismatched.jpg"]["clip_score"] == pytest.approx(0.1, abs=1e-4)
    assert by_name["unsafe.jpg"]["punsafe"] == pytest.approx(0.9)
    assert by_name["small.jpg"]["punsafe"] is None and by_name["missing.jpg"]["clip_score"] is None
    assert by_name["wide.jpg"]["width"] == 300 and by_name["short.jpg"]["caption_words"] == 1
    assert summary.counts == {"kept": 2, "dropped": 7} and summary.failures[CLIP_SCORE] == 1
    # `lmeye lineage` of a model trained on this curation shows the filters and thresholds behind it
    from lmeye.lineage import lineage, render, write_checkpoint_lineage

    ckpt = tmp_path / "train" / "align"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    write_checkpoint_lineage(str(ckpt), load_config(None, {"data.root": str(tmp_path), "train.curation": str(tmp_path / "curation")}))
    text = render(lineage(str(ckpt)))
    assert f"curation: {tmp_path / 'curation'}" in text
    for shown in ("min_clip_score=0.28", "max_punsafe=0.5", "max_pwatermark=0.5", "min_size=32", "max_aspect_ratio=3.0",
                  "min_caption_words=3", "dedup=False", "kept_rows=2"):
        assert shown in text, text
    # a rerun with nothing to do reads metadata only
    again, _ = curate(tmp_path, pairs, features, max_punsafe=0.5, max_pwatermark=0.5, min_size=32,
                      max_aspect_ratio=3.0, min_caption_words=3, min_clip_score=0.28, dedup=False)
    assert again.shards_done == 0 and again.shards_skipped == 2


def test_clip_score_top_fraction(tmp_path, images, ray_local):
    rng = np.random.default_rng(1)
    rows = [_row(f"{i}.jpg", images[i]) for i in range(10)]
    emb = _unit(rng, 10)
    cos = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    pairs, features = write_tables(tmp_path, rows, emb, _with_cosine(emb, cos, rng))
    _, got = curate(tmp_path, pairs, features, clip_score_top_fraction=0.3, dedup=False)
    kept = sorted(round(got[r["uid"]]["clip_score"], 2) for r in rows if got[r["uid"]]["keep"])
    assert kept == [0.4, 0.45, 0.5]
    assert all(got[r["uid"]]["reasons"] == [CLIP_SCORE] for r in rows if not got[r["uid"]]["keep"])


def test_top_fraction_threshold_from_histogram():
    s = np.linspace(-0.2, 0.6, 1001).astype(np.float32)
    t = scores.top_fraction_threshold(scores.score_histogram(s), 0.25)
    assert (s >= t).mean() == pytest.approx(0.25, abs=0.002)


def test_clip_filter_without_text_embeddings_names_the_option(tmp_path, images):
    rng = np.random.default_rng(2)
    rows = [_row(f"{i}.jpg", images[i]) for i in range(3)]
    pairs, features = write_tables(tmp_path, rows, _unit(rng, 3))
    with pytest.raises(UserError, match=r"extract\.text_embeddings: true"):
        curate(tmp_path, pairs, features, min_clip_score=0.28)
    assert not (tmp_path / "curation").exists()


@pytest.mark.parametrize("key,value", [("min_clip_score", 1.5), ("clip_score_top_fraction", 0), ("max_punsafe", -0.1),
                                       ("semdedup_threshold", 1.2), ("phash_max_distance", 65), ("max_aspect_ratio", 0.5)])
def test_thresholds_out_of_range_refused_at_load(key, value):
    with pytest.raises(ConfigError, match=rf"curate\.{key}"):
        load_config(None, {f"curate.{key}": value})


def test_exact_near_and_semantic_duplicates(tmp_path, images, ray_local):
    rng = np.random.default_rng(3)
    base = Image.open(io.BytesIO(images[0])).convert("RGB")
    near = _jpeg(base.resize((224, 224)), quality=70)  # re-encoded, resized
    rows = [_row("orig.jpg", images[0]), _row("exact_copy.jpg", images[0]), _row("resized.jpg", near)]
    # (demo images 4 and 5 are 4 bits apart: simple shapes on flat backgrounds; left out)
    rows += [_row(f"distinct{i}.jpg", images[i]) for i in (1, 2, 3, 4, 6, 7, 8, 9)]
    rows += [_row("semantic_copy.jpg", images[10])]
    emb = _unit(rng, len(rows))  # the three phash copies have unrelated embeddings: the hash alone finds them
    emb[-1] = emb[5] + 0.05 * _unit(rng)[0]  # ... and this one has another image but distinct3's embedding
    emb[-1] /= np.linalg.norm(emb[-1])
    pairs, features = write_tables(tmp_path, rows, emb)
    summary, got = curate(tmp_path, pairs, features, clusters=1, semdedup_threshold=0.95, phash_max_distance=4)
    by_name = {r["url"].rsplit("/", 1)[1]: got[r["uid"]] for r in rows}
    copies = ["orig.jpg", "exact_copy.jpg", "resized.jpg"]
    first = min(copies, key=lambda n: by_name[n]["uid"])
    assert by_name[first]["keep"] and by_name[first]["duplicate_of"] is None
    for n in set(copies) - {first}:
        assert by_name[n]["reasons"] == [DUPLICATE] and by_name[n]["duplicate_of"] == by_name[first]["uid"]
    pair = sorted(["distinct3.jpg", "semantic_copy.jpg"], key=lambda n: by_name[n]["uid"])
    assert by_name[pair[0]]["keep"] and by_name[pair[1]]["duplicate_of"] == by_name[pair[0]]["uid"]
    assert by_name["orig.jpg"]["phash"] == by_name["exact_copy.jpg"]["phash"]
    assert sum(not r["keep"] for r in got.values()) == 3
    assert summary.failures == {DUPLICATE: 3}
    # a run stopped after one shard: the rerun writes only the other one, with the same verdicts
    from lmeye.tables import Manifest, shard_file

    out = tmp_path / "curation"
    manifest = Manifest.load(str(out))
    lost = sorted(manifest.shards)[1]
    del manifest.shards[lost]
    manifest.complete = False
    manifest.save(str(out))
    (out / shard_file(lost)).unlink()
    again, regot = curate(tmp_path, pairs, features, clusters=1, semdedup_threshold=0.95, phash_max_distance=4)
    assert (again.shards_done, again.shards_skipped) == (1, 1)
    assert regot == got


def test_semdedup_finds_planted_groups_across_clusters():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(8, 64))
    x = centres[rng.integers(0, 8, 2000)] + 0.7 * rng.normal(size=(2000, 64))
    x = semdedup.normalise(x)
    groups = rng.permutation(2000)[:150].reshape(50, 3)
    for g in groups:
        x[g[1:]] = semdedup.normalise(x[g[0]] + 0.02 * rng.normal(size=(2, 64)))
    centroids = semdedup.train_kmeans(x[::2], 8, 20, seed=0)
    dup = semdedup.dedup_clusters(semdedup.Assigner(centroids)(x), x, 0.95)
    planted = {int(i) for g in groups for i in g}
    dropped = set(np.flatnonzero(dup >= 0).tolist())
    assert len(dropped) == 100 and dropped <= planted
    assert all(sum(int(i) in dropped for i in g) == 2 for g in groups)  # one kept per group


def test_a_phash_match_needs_the_embedding_too_with_phash_min_cosine():
    """A phash is colour-blind: two scenes of one layout in other colours can be 2 bits apart (demo seeds 1
    and 2). With curate.phash_min_cosine their unlike embeddings keep both; a near copy (same embedding) is
    still a duplicate, and the cosine alone (below the SemDeDup threshold) drops nothing."""
    rng = np.random.default_rng(5)
    emb = _unit(rng, 4)
    emb[1] = semdedup.normalise(emb[:1] + 0.1 * _unit(rng))[0]  # a near copy of row 0: cosine ~0.99
    hashes = np.array([0b1011, 0b1001, 0b1110, 0xFFFF_FFFF_0000_0000], np.uint64)  # 0-1: 1 bit; 0-2: 2 bits; 3: far
    valid = np.ones(4, bool)
    labels = np.zeros(4, np.int64)
    cos = float(emb[0] @ emb[2])
    assert cos < 0.5 and float(emb[0] @ emb[1]) > 0.9
    plain = semdedup.dedup_clusters(labels, emb, 0.999, None, hashes, valid, 3)
    assert plain.tolist() == [-1, 0, 0, -1]  # the phash alone: row 2 is a false drop
    both = semdedup.dedup_clusters(labels, emb, 0.999, None, hashes, valid, 3, phash_min_cosine=0.9)
    assert both.tolist() == [-1, 0, -1, -1]
    with pytest.raises(ConfigError, match=r"curate\.phash_min_cosine"):
        load_config(None, {"curate.phash_min_cosine": 1.5})


def _mme(root: Path, image: bytes) -> Path:
    sub = root / "existence"
    (sub / "images").mkdir(parents=True)
    (sub / "questions_answers_YN").mkdir()
    (sub / "images" / "0001.jpg").write_bytes(image)
    (sub / "questions_answers_YN" / "0001.txt").write_text("Is there a circle?\tYes\nIs there a dog?\tNo\n")
    return root


def test_benchmark_decontamination(tmp_path, images, ray_local):
    rng = np.random.default_rng(5)
    held_out = Image.open(io.BytesIO(images[4])).convert("RGB")
    bench = _mme(tmp_path / "mme", _jpeg(held_out, quality=95))
    rows = [_row(f"{i}.jpg", images[i]) for i in range(4)] + [_row("leaked.jpg", _jpeg(held_out, quality=60))]
    pairs, features = write_tables(tmp_path, rows, _unit(rng, len(rows)))
    summary, got = curate(tmp_path, pairs, features, benchmarks=[str(bench)], dedup=False)
    leaked = got[rows[-1]["uid"]]
    assert leaked["reasons"] == [CONTAMINATED] and leaked["contaminated_by"] == "mme:existence/0001.jpg"
    assert all(got[r["uid"]]["keep"] for r in rows[:-1])


def test_benchmark_folder_in_no_known_layout_is_one_error(tmp_path, images):
    rng = np.random.default_rng(6)
    rows = [_row("0.jpg", images[0])]
    pairs, features = write_tables(tmp_path, rows, _unit(rng, 1), shards=1)
    odd = tmp_path / "not_a_benchmark"
    odd.mkdir()
    (odd / "readme.txt").write_text("hello")
    with pytest.raises(LayoutError, match=str(odd)):
        curate(tmp_path, pairs, features, benchmarks=[str(odd)])


def test_extract_text_embeddings_feed_the_clip_score(tmp_path, ray_local):
    """extract.text_embeddings: true writes open_clip's encode_text of each caption; curate scores with it."""
    import open_clip
    import torch

    from lingcloud_testing import build_pairs_table
    from lmeye import clip
    from pipelines.extract import run as extract

    pairs = build_pairs_table(tmp_path / "pairs", 6, shards=2, corrupt=1, failed=1, size=40)
    cfg = load_config(None, {"data.root": str(tmp_path), "extract.model": clip.TINY_MODEL, "extract.pretrained": None,
                             "extract.dtype": "float32", "extract.text_embeddings": True, "extract.batch_size": 4,
                             "extract.decode_num_cpus": 0.5, "ray.num_cpus": 2})
    ckpt = clip.ensure_demo_model(cfg.extract)
    assert extract(cfg).ok
    feats = TableReader(str(tmp_path / "features"), FEATURES).read()
    ok = [s == SUCCESS for s in feats["status"].to_pylist()]
    assert feats[TEXT_EMBEDDING].to_pylist()[ok.index(False)] is None  # the corrupt image: no row to score
    captions = dict(zip(pairs["uid"].to_pylist(), pairs["caption"].to_pylist()))
    uids = [u for u, good in zip(feats["uid"].to_pylist(), ok) if good]
    model, _, _ = open_clip.create_model_and_transforms(clip.TINY_MODEL, pretrained=ckpt)
    with torch.no_grad():
        ref = model.eval().encode_text(open_clip.get_tokenizer(clip.TINY_MODEL)([captions[u] for u in uids]), normalize=True)
    got = np.array([v for v, good in zip(feats[TEXT_EMBEDDING].to_pylist(), ok) if good], np.float32)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)

    # a benchmark (MME layout) holding a copy of one training image, matched by the CLIP embedding of the
    # features table's own model (phash off: 0 bits). The tiny random CLIP puts some demo images at
    # cosine 0.999 to each other, so the copy is of the image farthest from the rest, and the
    # threshold sits between that distance and the copy's own cosine (1).
    image_rows = np.array([v for v, good in zip(feats["embedding"].to_pylist(), ok) if good], np.float32)
    unit = image_rows / np.linalg.norm(image_rows, axis=1, keepdims=True)
    sim = unit @ unit.T - 2 * np.eye(len(unit))
    far = int(sim.max(axis=1).argmin())
    threshold = (1 + float(sim[far].max())) / 2
    leaked = uids[far]
    original = dict(zip(pairs["uid"].to_pylist(), pairs["image"].to_pylist()))[leaked]
    bench = _mme(tmp_path / "mme", original)
    _, verdict = curate(tmp_path, tmp_path / "pairs", tmp_path / "features", min_clip_score=-1.0, dedup=False,
                        benchmarks=[str(bench)], decontam_phash_max_distance=0, decontam_min_cosine=threshold)
    assert verdict[leaked]["reasons"] == [CONTAMINATED] and verdict[leaked]["contaminated_by"] == "mme:existence/0001.jpg"
    rest = [i for i in range(len(uids)) if i != far]
    uids, got, image_rows = [uids[i] for i in rest], got[rest], image_rows[rest]
    image = np.array(image_rows, np.float32)
    want = (image * got).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(got, axis=1)
    np.testing.assert_allclose([verdict[u]["clip_score"] for u in uids], want, atol=1e-5)
    assert all(verdict[u]["keep"] for u in uids)


def write_curation(path: Path, verdicts: dict[str, bool]) -> Path:
    """A curation table as the curate stage writes it (keep per uid; the reason 'duplicate' for drops)."""
    schema = CURATION.with_metadata(CURATION.schema)
    rows = [{"uid": u, "keep": k, "reasons": [] if k else [DUPLICATE]} for u, k in verdicts.items()]
    writer = TableWriter(str(path), CURATION, config={"fixture": "curation", "min_clip_score": 0.28})
    writer.write("00000.parquet", pa.Table.from_pylist(rows, schema=schema))
    writer.finalize(["00000.parquet"], stats={})
    return path


def test_instruct_keeps_only_the_curated_uids(tmp_path, make_pairs):
    from lingcloud_testing import build_features_table
    from lmeye.tables import Manifest
    from pipelines.instruct import run as instruct
    from schemas.instructions import INSTRUCTIONS

    _, pairs = make_pairs(num_images=10)
    good = [u for u, s, c in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist(), pairs["caption"].to_pylist())
            if s == SUCCESS and c != "not an image"]
    build_features_table(tmp_path / "features", good)
    dropped = set(good[:4])
    write_curation(tmp_path / "curation", {u: u not in dropped for u in good})
    overrides = {"data.root": str(tmp_path), "instruct.val_fraction": 0.2}
    assert instruct(load_config(None, overrides)).ok
    before = {r["uid"] for r in TableReader(str(tmp_path / "instructions"), INSTRUCTIONS).read().to_pylist()}
    assert before == set(good)
    overrides.update({"instruct.curation": str(tmp_path / "curation"), "instruct.output": str(tmp_path / "curated")})
    summary = instruct(load_config(None, overrides))
    rows = TableReader(str(tmp_path / "curated"), INSTRUCTIONS).read().to_pylist()
    assert {r["uid"] for r in rows} == set(good) - dropped
    stats = Manifest.load(str(tmp_path / "curated")).stats
    per_image = len([r for r in rows]) // len(set(good) - dropped)
    assert stats["sources"]["captions"]["curated_out"] == per_image * len(dropped)
    assert stats["curation"]["kept_uids"] == len(good) - len(dropped)
    assert any("curated_out" in n for n in summary.notes)


def test_train_refuses_instructions_not_built_with_its_curation(tmp_path, make_pairs):
    from lingcloud_testing import build_features_table
    from pipelines.instruct import run as instruct
    from pipelines.train import run as train

    _, pairs = make_pairs(num_images=4)
    good = [u for u, s, c in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist(), pairs["caption"].to_pylist())
            if s == SUCCESS and c != "not an image"]
    build_features_table(tmp_path / "features", good)
    curation = str(write_curation(tmp_path / "curation", {u: i > 0 for i, u in enumerate(good)}))
    base = {"data.root": str(tmp_path), "instruct.val_fraction": 0.25}
    assert instruct(load_config(None, base)).ok
    cfg = load_config(None, {**base, "train.curation": curation})
    with pytest.raises(UserError, match=r"built without instruct\.curation.*instruct\.curation="):
        train(cfg, factory=object())  # refused before any model is built
    assert instruct(load_config(None, {**base, "instruct.curation": curation, "instruct.output": str(tmp_path / "cur")})).ok
    from pipelines.instruct.curation import check_built_with

    check_built_with(str(tmp_path / "cur"), curation)  # the same table, unchanged: accepted
    write_curation(tmp_path / "curation2", {u: True for u in good})
    with pytest.raises(UserError, match="curation2"):
        check_built_with(str(tmp_path / "cur"), str(tmp_path / "curation2"))


def test_contamination_by_phash_or_embedding():
    from pipelines.curate.tasks import contamination

    rng = np.random.default_rng(7)
    bench = {"labels": ["mme:a", "mme:b"], "hashes": np.array([0, 0xFFFF_FFFF_FFFF_FFFF], np.uint64),
             "embeddings": _unit(rng, 2)}
    hashes = np.array([0b111, 0x0F0F_0F0F_0F0F_0F0F, 0x0F0F_0F0F_0F0F_0F0F, 0b1], np.uint64)
    emb = np.stack([_unit(rng)[0], bench["embeddings"][1] + 0.01 * _unit(rng)[0], _unit(rng)[0], _unit(rng)[0]])
    valid = np.array([True, True, True, False])
    has = np.array([True, True, True, True])
    # row 0: 3 bits from a; row 1: b's embedding; row 2: neither; row 3: 1 bit from a but its hash is not valid
    assert contamination(hashes, valid, emb, has, bench, 4, 0.95) == ["mme:a", "mme:b", None, None]
    assert contamination(hashes, valid, emb, has, bench, 4, None) == ["mme:a", None, None, None]
