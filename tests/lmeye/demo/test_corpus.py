"""The demo corpus is deterministic, true to its captions, and served (and broken) as promised."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from lmeye.demo.corpus import (
    COLOURS,
    POSITIONS,
    SHAPES,
    TEXTURE_AMPLITUDE,
    generate_items,
    load_corpus,
    qa_pairs,
    render,
    write_corpus,
    write_url_list,
)
from lmeye.demo.server import DemoServer, start_server_process

NUM_IMAGES = 12
IMAGE_SIZE = 48


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", num_images=NUM_IMAGES, seed=3, image_size=IMAGE_SIZE)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- generation -----------------------------------------------------------------------------


def test_same_seed_same_items_and_bytes():
    first, second = generate_items(20, seed=7), generate_items(20, seed=7)
    assert first == second
    assert [render(i) for i in first] == [render(i) for i in second]


def test_different_seed_different_items():
    assert generate_items(20, seed=0) != generate_items(20, seed=1)


def test_items_have_one_to_three_shapes_at_distinct_positions():
    items = generate_items(200, seed=0)
    assert {len(item.objects) for item in items} == {1, 2, 3}
    for item in items:
        positions = [p for _, _, p in item.objects]
        assert len(set(positions)) == len(positions)
        assert set(positions) <= set(POSITIONS)
        assert {s for s, _, _ in item.objects} <= set(SHAPES)
        assert item.background not in {c for _, c, _ in item.objects}
        for shape, colour, _ in item.objects:
            assert f"{colour} {shape}" in item.caption
        assert f"{item.background} background" in item.caption
    assert [item.name for item in items[:2]] == ["img_00000.jpg", "img_00001.jpg"]


def test_max_objects_bounds_the_shapes_and_leaves_the_default_corpus_alone():
    assert {len(item.objects) for item in generate_items(100, seed=0, max_objects=1)} == {1}
    assert {len(item.objects) for item in generate_items(100, seed=0, max_objects=2)} == {1, 2}
    assert generate_items(50, seed=0, max_objects=3) == generate_items(50, seed=0)
    with pytest.raises(ValueError, match="max_objects 6"):
        generate_items(1, max_objects=6)


def test_render_is_a_jpeg_of_the_requested_size_with_the_background_colour():
    item = generate_items(1, seed=0)[0]
    image = Image.open(io.BytesIO(render(item, size=80)))
    assert image.format == "JPEG" and image.size == (80, 80) and image.mode == "RGB"
    corner = image.getpixel((1, 1))  # no position reaches the corners
    # the background texture (lmeye.demo.corpus.TEXTURE_AMPLITUDE) varies it, JPEG a little more
    assert all(abs(a - b) <= 12 + 1.5 * TEXTURE_AMPLITUDE for a, b in zip(corner, COLOURS[item.background]))
    flat = Image.open(io.BytesIO(render(dataclasses.replace(item, jitter=None), size=80))).getpixel((1, 1))
    assert all(abs(a - b) <= 12 for a, b in zip(flat, COLOURS[item.background]))


def test_qa_answers_agree_with_the_item():
    for item in generate_items(100, seed=2):
        answers = {qa["question"]: qa["answer"] for qa in qa_pairs(item)}
        assert answers["How many shapes are in the image?"] == str(len(item.objects))
        assert answers["What colour is the background?"] == item.background
        shapes = [s for s, _, _ in item.objects]
        for shape, colour, position in item.objects:
            where = "in the centre" if position == "centre" else f"at the {position}"
            assert answers[f"What shape is {where}?"] == shape
            assert answers[f"What colour is the shape {where}?"] == colour
            question = f"What colour is the {shape}?"
            # Asked only when unambiguous; then it names this shape's colour.
            assert (question in answers) == (shapes.count(shape) == 1)
            if question in answers:
                assert answers[question] == colour
            if f"Where is the {colour} {shape}?" in answers:
                assert answers[f"Where is the {colour} {shape}?"] == position


def test_each_fact_is_the_caption_phrase_that_holds_the_answer():
    for item in generate_items(100, seed=2):
        pairs = qa_pairs(item, with_facts=True)
        assert [{k: v for k, v in p.items() if k != "fact"} for p in pairs] == qa_pairs(item)
        for p in pairs:
            assert p["answer"] in p["fact"]
            if not p["question"].startswith("How many"):
                assert p["fact"] in item.caption, (p, item.caption)


def test_ambiguous_colour_question_is_skipped():
    items = generate_items(300, seed=0)
    item = next(i for i in items if len({s for s, _, _ in i.objects}) < len(i.objects))
    repeated = next(s for s, _, _ in item.objects if [o[0] for o in item.objects].count(s) > 1)
    assert all(qa["question"] != f"What colour is the {repeated}?" for qa in qa_pairs(item))


# --- the written corpus ---------------------------------------------------------------------


def test_good_images_decode_at_the_configured_size(corpus):
    assert len(corpus.good_names()) == NUM_IMAGES
    for item in corpus.items:
        data = (corpus.root / "images" / item.name).read_bytes()
        assert data == render(item, IMAGE_SIZE)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("name", ["not_an_image.jpg", "truncated.jpg"])
def test_broken_files_fail_to_decode(corpus, name):
    with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
        with Image.open(corpus.root / "images" / name) as image:
            image.load()


def test_expected_failures(corpus):
    assert corpus.expected_failures() == {
        "not_an_image.jpg": "not_an_image",
        "truncated.jpg": "truncated",
        "missing.jpg": "404",
        "server_error.jpg": "500",
    }
    assert not (corpus.root / "images" / "missing.jpg").exists()
    assert not (corpus.root / "images" / "server_error.jpg").exists()


def test_captions_and_annotations_files(corpus):
    lines = (corpus.root / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"image": item.name, "caption": item.caption} for item in corpus.items
    ]
    annotations = json.loads((corpus.root / "annotations.json").read_text())
    assert annotations == [{"image": i.name, **qa} for i in corpus.items for qa in qa_pairs(i)]


def test_write_corpus_is_idempotent_and_loadable(corpus):
    before = _tree(corpus.root)
    mtimes = {p: p.stat().st_mtime_ns for p in corpus.root.rglob("*")}
    again = write_corpus(corpus.root, num_images=NUM_IMAGES, seed=3, image_size=IMAGE_SIZE)
    assert _tree(corpus.root) == before
    assert {p: p.stat().st_mtime_ns for p in corpus.root.rglob("*")} == mtimes
    assert again == corpus
    assert load_corpus(corpus.root) == corpus


# --- URL lists ------------------------------------------------------------------------------


def _read_url_list(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if fmt == "tsv" else ","))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_url_list_formats(corpus, tmp_path, fmt):
    base = "http://127.0.0.1:9999"
    path = write_url_list(
        corpus, base + "/", tmp_path / f"urls.{fmt}", fmt=fmt, url_col="link", caption_col="text"
    )
    rows = _read_url_list(path, fmt)
    assert all(set(row) == {"link", "text"} and row["text"] for row in rows)
    urls = [row["link"] for row in rows]
    expected = {f"{base}/images/{name}" for name in corpus.good_names()} | {
        f"{base}/images/not_an_image.jpg",
        f"{base}/images/truncated.jpg",
        f"{base}/images/missing.jpg",
        f"{base}/status/500/server_error.jpg",
    }
    assert len(urls) == len(expected) and set(urls) == expected
    # Broken entries are spread through the list, neither first nor all at the end.
    broken_at = [i for i, url in enumerate(urls) if url.rsplit("/", 1)[1] in corpus.broken]
    assert broken_at[0] > 0 and broken_at[-1] < len(urls) - 1
    again = write_url_list(corpus, base, tmp_path / f"again.{fmt}", fmt, "link", "text")
    assert path.read_bytes() == again.read_bytes()  # deterministic, and a trailing "/" is ignored


def test_url_list_rejects_unknown_format(corpus, tmp_path):
    with pytest.raises(ValueError, match="xml"):
        write_url_list(corpus, "http://x", tmp_path / "urls.xml", fmt="xml")


# --- server ---------------------------------------------------------------------------------


def test_server_serves_files_and_simulated_failures(corpus):
    name = corpus.good_names()[0]
    with DemoServer(corpus.root) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        image_bytes = (corpus.root / "images" / name).read_bytes()
        assert _get(f"{server.base_url}/images/{name}") == (200, image_bytes)
        assert _get(f"{server.base_url}/images/missing.jpg")[0] == 404
        assert _get(f"{server.base_url}/status/500/server_error.jpg")[0] == 500

        head = urllib.request.Request(f"{server.base_url}/images/{name}", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.status == 200 and response.read() == b""

        assert server.request_count("missing.jpg") == 1
        assert server.request_count(name) == 2
        assert server.requests[0] == f"/images/{name}"
        server.clear_log()
        assert server.requests == [] and server.request_count(name) == 0


def test_server_does_not_serve_outside_its_root(corpus):
    with DemoServer(corpus.root / "images") as server:
        assert _get(f"{server.base_url}/%2e%2e/corpus.json")[0] == 404


def test_slow_route_times_out_then_serves(corpus):
    name = corpus.good_names()[0]
    with DemoServer(corpus.root) as server:
        with pytest.raises(OSError):  # socket.timeout / URLError wrapping it
            urllib.request.urlopen(f"{server.base_url}/slow/2/images/{name}", timeout=0.2).read()
        assert _get(f"{server.base_url}/slow/0.05/images/{name}")[0] == 200
        assert server.request_count(name) == 2


def test_server_process_serves_until_terminated(corpus):
    process, base_url = start_server_process(corpus.root)
    try:
        assert process.poll() is None
        name = corpus.good_names()[0]
        assert _get(f"{base_url}/images/{name}") == (200, (corpus.root / "images" / name).read_bytes())
    finally:
        process.terminate()
        process.wait(timeout=5)
        process.stdout.close()
    assert process.returncode is not None
