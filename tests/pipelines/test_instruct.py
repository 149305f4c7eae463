"""The instruct stage: every source, the uid mapping, the split, dedup, bad input, resume, HF."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lingcloud_testing import build_features_table, io_delta, process_io, write_vqa_file

from lmeye.cli import main
from lmeye.config import ConfigError, load_config
from lmeye.demo.corpus import qa_pairs, write_corpus
from lmeye.errors import UserError
from lmeye.tables import (
    Manifest,
    NotATableFolder,
    TableMismatch,
    TableReader,
    TableWriter,
    overwriting,
)
from lmeye.templates import CAPTIONS
from lmeye.uid import uid_for
from pipelines.instruct import Placement, run, split_files
from pipelines.instruct.captions import load_templates
from pipelines.instruct.images import key_of
from pipelines.instruct.jsonio import Malformed, iter_records
from schemas import SchemaError
from schemas.features import FEATURES
from schemas.instructions import INSTRUCTIONS

OUTCOMES = ("kept", "duplicate", "no_features", "sampled_out", "over_cap", "malformed")


# ---------------------------------------------------------------------------------------------
# helpers


def write_features(path: Path, uids: list[str], failed: list[str] = ()) -> Path:
    """A features table (uid, status, error_message, embedding), as the extract stage writes it."""
    return build_features_table(path, list(uids), list(failed))


def success_uids(pairs: pa.Table) -> list[str]:
    return [u for u, s, img in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist(), pairs["caption"].to_pylist())
            if s == "success" and img != "not an image"]


def make_cfg(tmp_path: Path, sources: list[dict], **instruct):
    overrides = {
        "data.root": str(tmp_path),
        "instruct.sources": sources,
        "instruct.val_fraction": instruct.pop("val_fraction", 0.25),
    }
    overrides.update({f"instruct.{k}": v for k, v in instruct.items()})
    return load_config(None, overrides)


def read_rows(cfg) -> list[dict]:
    return TableReader(cfg.instruct.output, INSTRUCTIONS).read().to_pylist()


def source_stats(cfg) -> dict:
    return Manifest.load(cfg.instruct.output).stats["sources"]


def assert_adds_up(cfg) -> None:
    for name, s in source_stats(cfg).items():
        total = sum(s[k] for k in OUTCOMES) + sum(s["rejected"].values())
        assert total == s["input"], (name, s)


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def write_jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.fixture
def coco_world(tmp_path, make_pairs):
    """pairs of 12 good images under COCO's URLs (train2017/00000000000N.jpg), all with features."""
    _, pairs = make_pairs(num_images=12, coco_names=True)
    good = success_uids(pairs)
    write_features(tmp_path / "features", good)
    return {"pairs": pairs, "good": good}


@pytest.fixture
def world(tmp_path, make_pairs):
    """pairs (12 good demo images, 1 corrupt, 1 failed) + features for the first 10 good images."""
    pairs_path, pairs = make_pairs(num_images=12)
    good = success_uids(pairs)
    write_features(tmp_path / "features", good[:10], failed=[pairs["uid"][12].as_py()])
    names = [u.rsplit("/", 1)[-1] for u in pairs["url"].to_pylist()]
    return {"pairs": pairs, "good": good, "with_features": set(good[:10]), "names": names, "tmp": tmp_path}


# ---------------------------------------------------------------------------------------------
# sources


def test_captions_from_pairs_use_the_templates(world, tmp_path):
    cfg = make_cfg(tmp_path, [{"kind": "captions"}])
    summary = run(cfg)
    rows = read_rows(cfg)
    pairs = world["pairs"].to_pylist()
    captions = {p["uid"]: p["caption"] for p in pairs}
    templates = load_templates(str(CAPTIONS), ["short_caption", "detailed_description", "grounded_qa"])
    assert {r["uid"] for r in rows} == world["with_features"]
    for r in rows:
        (user, assistant) = r["conversation"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if r["task"] == "grounded_qa":
            continue  # test_grounded_questions_ask_what_the_caption_states
        t = templates[r["task"]]
        assert user["content"] in t.prompts
        cap = captions[r["uid"]].rstrip(".")
        assert cap[1:] in assistant["content"]
    assert len({r["task"] for r in rows}) >= 2  # several tasks and phrasings, chosen by hash
    st = source_stats(cfg)["captions"]
    # 12 good + 1 corrupt (success, no features) + 1 failed download
    assert st["input"] == 14 and st["kept"] == 10 and st["no_features"] == 3
    assert st["rejected"] == {"image_failed": 1}
    assert summary.rows == 10 and summary.ok
    assert_adds_up(cfg)


def test_templates_file_is_validated(world, tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("short_caption:\n  prompts: [Describe.]\n  responses: ['no placeholder']\n")
    cfg = make_cfg(tmp_path, [{"kind": "captions", "tasks": {"short_caption": 1}}], templates=str(bad))
    with pytest.raises(UserError, match="uses neither"):
        run(cfg)
    good = tmp_path / "t2.yaml"
    good.write_text("mine:\n  prompts: ['Caption it.']\n  responses: ['Sure: {caption}']\n")
    cfg = make_cfg(tmp_path, [{"kind": "captions", "tasks": {"mine": 1}}], templates=str(good))
    run(cfg)
    rows = read_rows(cfg)
    assert rows and all(r["task"] == "mine" and r["conversation"][1]["content"].startswith("Sure: ") for r in rows)


def test_vqa_demo_corpus_by_basename(tmp_path, make_pairs):
    pairs_path, pairs = make_pairs(num_images=6, corrupt=0, failed=0)
    corpus = write_corpus(tmp_path / "corpus", num_images=6)
    write_features(tmp_path / "features", pairs["uid"].to_pylist())
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": "{demo.corpus_dir}/annotations.json"}],
                   val_fraction=0.0)
    cfg.demo.corpus_dir = str(tmp_path / "corpus")
    run(cfg)
    rows = read_rows(cfg)
    expected = {(uid_for(f"http://127.0.0.1/images/{i.name}"), qa["question"], qa["answer"])
                for i in corpus.items for qa in qa_pairs(i)}
    got = {(r["uid"], r["conversation"][0]["content"], r["conversation"][1]["content"]) for r in rows}
    assert got == expected
    assert {r["task"] for r in rows} == {"vqa"} and {r["source"] for r in rows} == {"vqa"}
    assert {r["split"] for r in rows} == {"train"}


def test_image_key_rules(world, tmp_path):
    names, pairs = world["names"], world["pairs"]
    u0, n0 = pairs["uid"][3].as_py(), names[3]  # img_00003.jpg (id 0 is ambiguous: corrupt_0, missing_0)
    recs = [
        {"image": n0, "question": "q basename", "answer": "a"},
        {"image": f"/some/where/{n0}", "question": "q basename of a path", "answer": "a"},
        {"image": "nope.jpg", "question": "q unknown", "answer": "a"},
        {"image": "missing_0.jpg", "question": "q failed download", "answer": "a"},
    ]
    src = [{"kind": "vqa", "name": "by_name", "path": write_json(tmp_path / "a.json", recs)},
           {"kind": "vqa", "name": "by_path", "image_key": "path", "path_components": 2,
            "path": write_json(tmp_path / "c.json", [{"image": f"images/{n0}", "question": "q path", "answer": "a"},
                                                    {"image": f"other/{n0}", "question": "q wrong dir", "answer": "a"}])},
           {"kind": "vqa", "name": "by_url", "image_key": "url", "url_prefix": "http://127.0.0.1/images/",
            "path": write_json(tmp_path / "d.json", [{"image": n0, "question": "q url", "answer": "a"}])},
           {"kind": "vqa", "name": "by_uid", "image_key": "uid",
            "path": write_json(tmp_path / "e.json", [{"image": u0, "question": "q uid", "answer": "a"},
                                                    {"image": "not-a-uid", "question": "q", "answer": "a"}])}]
    cfg = make_cfg(tmp_path, src)
    run(cfg)
    rows = read_rows(cfg)
    assert {r["conversation"][0]["content"] for r in rows} == {
        "q basename", "q basename of a path", "q path", "q url", "q uid"}
    assert {r["uid"] for r in rows} == {u0}
    st = source_stats(cfg)
    assert st["by_name"]["rejected"] == {"image_not_in_pairs": 1, "image_failed": 1}
    assert st["by_path"]["rejected"] == {"image_not_in_pairs": 1}
    assert st["by_uid"]["rejected"] == {"bad_uid": 1}
    assert_adds_up(cfg)


def test_coco_id_keys():
    assert key_of("COCO_train2014_000000123456.jpg", "coco_id") == "123456"
    assert key_of("COCO_val2014_000000000042.jpg", "coco_id") == "42"
    assert key_of("train2017/000000123456.jpg", "coco_id") == "123456"
    assert key_of("http://images.cocodataset.org/train2017/000000123456.jpg?x=1", "coco_id") == "123456"
    assert key_of(123456, "coco_id") == "123456"
    # only COCO's own names: trailing digits of another corpus's file name are not an id
    for other in ("0a0bc91825468c45.jpg", "n161313.jpg", "1000092795.jpg", "img_00003.jpg", "123456.jpg"):
        assert key_of(other, "coco_id") is None, other
    assert key_of("a/b/c.jpg", "path", 2) == "b/c.jpg"


def test_ambiguous_basename_is_rejected(tmp_path):
    from schemas.pairs import PAIRS

    urls = ["http://a.example/x/cat.jpg", "http://b.example/y/cat.jpg", "http://a.example/x/dog.jpg"]
    rows = [dict(uid=uid_for(u), url=u, caption="c", status="success") for u in urls]
    w = TableWriter(str(tmp_path / "pairs"), PAIRS, config={})
    w.write("00000.parquet", pa.Table.from_pylist(rows, schema=PAIRS.schema))
    w.finalize(["00000.parquet"], stats={})
    write_features(tmp_path / "features", [uid_for(u) for u in urls])
    recs = [{"image": "cat.jpg", "question": "q", "answer": "a"}, {"image": "dog.jpg", "question": "q", "answer": "a"}]
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)},
                              {"kind": "vqa", "name": "by_path", "image_key": "path",
                               "path": write_json(tmp_path / "p.json", [{"image": "y/cat.jpg", "question": "q", "answer": "a"}])}])
    run(cfg)
    assert source_stats(cfg)["vqa"]["rejected"] == {"ambiguous_image": 1}
    assert {r["uid"] for r in read_rows(cfg)} == {uid_for(urls[2]), uid_for(urls[1])}  # path disambiguates


def test_llava_multi_turn_kept_whole(world, tmp_path):
    n0, n1 = world["names"][0], world["names"][1]
    good = {"id": "1", "image": n0, "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "Shapes."},
        {"from": "human", "value": "Which colours?"},
        {"from": "gpt", "value": "Red and blue."},
        {"from": "human", "value": "And the background?"},
        {"from": "gpt", "value": "White."}]}
    bad = [
        {"id": "nu", "image": n1, "conversations": [{"from": "gpt", "value": "hello"}]},
        {"id": "na", "image": n1, "conversations": [{"from": "human", "value": "hi?"}]},
        {"id": "ea", "image": n1, "conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "  "}]},
        {"id": "ur", "image": n1, "conversations": [{"from": "robot", "value": "hi?"}, {"from": "gpt", "value": "x"}]},
        {"id": "uq", "image": n1, "conversations": [{"from": "human", "value": "a?"}, {"from": "gpt", "value": "b"},
                                                    {"from": "human", "value": "c?"}]},
        {"id": "ni", "conversations": [{"from": "human", "value": "text only?"}, {"from": "gpt", "value": "yes"}]},
    ]
    cfg = make_cfg(tmp_path, [{"kind": "llava", "path": write_json(tmp_path / "llava.json", [good] + bad)}])
    run(cfg)
    rows = [r for r in read_rows(cfg) if r["uid"] is not None]
    assert len(rows) == 1
    conv = rows[0]["conversation"]
    assert [t["role"] for t in conv] == ["user", "assistant"] * 3
    assert conv[0]["content"] == "What is in the picture?"  # <image> placeholder stripped
    assert conv[3]["content"] == "Red and blue." and rows[0]["task"] == "conversation"
    assert rows[0]["source_id"] == "1"
    st = source_stats(cfg)["llava"]
    assert st["rejected"] == {"no_user_turn": 1, "no_answer": 1, "empty_answer": 1, "unknown_role": 1,
                              "unanswered_question": 1}
    assert st["input"] == 7 and st["kept"] == 2 and st["text_only"] == 1  # "ni" is text-only: kept
    assert_adds_up(cfg)


def test_lmeyemid_records_jsonl_gz(coco_world, tmp_path):
    uids = coco_world["pairs"]["uid"].to_pylist()
    recs = [{"question": f"Q{i}? <image>", "answer": f"A{i}", "image_path": f"/data/coco/train2014/COCO_train2014_{i:012d}.jpg",
             "chunk_belong": i % 3} for i in range(1, 5)]
    recs.append({"question": "Q?", "answer": "", "image_path": "COCO_train2014_000000000001.jpg", "chunk_belong": 0})
    path = tmp_path / "mid.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    cfg = make_cfg(tmp_path, [{"kind": "lmeyemid", "path": str(path), "image_key": "coco_id"}])
    run(cfg)
    rows = sorted(read_rows(cfg), key=lambda r: r["conversation"][0]["content"])
    assert [r["conversation"][0]["content"] for r in rows] == ["Q1?", "Q2?", "Q3?", "Q4?"]
    assert [r["uid"] for r in rows] == uids[1:5]  # COCO_train2014_00000000000N.jpg is train2017/00000000000N.jpg
    assert {r["task"] for r in rows} == {"instruction"}
    assert source_stats(cfg)["lmeyemid"]["rejected"] == {"empty_answer": 1}
    assert_adds_up(cfg)


def test_captions_from_a_file(world, tmp_path):
    n = world["names"]
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": n[0], "caption": "A red circle."},
                                                 {"image": n[0], "caption": "Another caption."},
                                                 {"image": n[1], "caption": ""}])
    cfg = make_cfg(tmp_path, [{"kind": "captions", "path": path, "tasks": {"short_caption": 1}}])
    run(cfg)
    rows = read_rows(cfg)
    assert sorted(r["conversation"][1]["content"] for r in rows) == ["A red circle.", "Another caption."]
    assert source_stats(cfg)["captions"]["rejected"] == {"no_caption": 1}


# ---------------------------------------------------------------------------------------------
# split, dedup, shuffle, weights


def test_split_by_uid_no_image_on_both_sides(world, tmp_path):
    n = world["names"][:10]
    recs = [{"image": name, "question": f"q{k}", "answer": "a"} for name in n for k in range(5)]
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}, {"kind": "captions"}],
                   val_fraction=0.4, partition_mb=0.001)
    run(cfg)
    m = Manifest.load(cfg.instruct.output)
    assert m.stats["partitions"] > 1
    rows = read_rows(cfg)
    train = {r["uid"] for r in rows if r["split"] == "train"}
    val = {r["uid"] for r in rows if r["split"] == "validation"}
    assert train and val and not (train & val)
    files = split_files(cfg.instruct.output)
    for split, paths in files.items():
        for p in paths:
            assert set(pq.read_table(p, columns=["split"])["split"].to_pylist()) <= {split}
    placement = Placement(1, 0, 0.4)
    assert all(placement.is_validation(u) for u in val) and not any(placement.is_validation(u) for u in train)
    # the shuffle seed never moves an image across the split
    cfg2 = make_cfg(tmp_path, cfg.instruct.model_dump(mode="json")["sources"], val_fraction=0.4, seed=7,
                    output=str(tmp_path / "other"), partition_mb=0.001)
    run(cfg2)
    rows2 = read_rows(cfg2)
    assert {r["uid"] for r in rows2 if r["split"] == "validation"} == val
    assert [r["sample_id"] for r in rows2] != [r["sample_id"] for r in rows]  # reshuffled
    assert sorted(r["sample_id"] for r in rows2 if r["source"] == "vqa") == sorted(r["sample_id"] for r in rows if r["source"] == "vqa")


def test_deterministic_order_and_sample_ids(world, tmp_path):
    recs = [{"image": name, "question": f"q{k}", "answer": "a"} for name in world["names"][:10] for k in range(3)]
    srcs = [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}]
    a = make_cfg(tmp_path, srcs, output=str(tmp_path / "a"), partition_mb=0.001)
    b = make_cfg(tmp_path, srcs, output=str(tmp_path / "b"), partition_mb=0.001, chunk_rows=7)
    run(a), run(b)
    ra, rb = read_rows(a), read_rows(b)
    assert ra == rb and len({r["sample_id"] for r in ra}) == len(ra) == 30


def test_exact_duplicates_removed_within_and_across_sources(world, tmp_path):
    n = world["names"]
    recs = [{"image": n[0], "question": "Q?", "answer": "A"},
            {"image": n[0], "question": "Q?", "answer": "A"},      # exact duplicate
            {"image": n[0], "question": "Q?", "answer": "B"},      # same question, other answer: kept
            {"image": n[1], "question": "Q?", "answer": "A"}]      # other image: kept
    mid = [{"question": "Q?", "answer": "A", "image_path": n[0], "chunk_belong": 0}]  # duplicate of vqa's first
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)},
                              {"kind": "lmeyemid", "image_key": "basename", "task": "vqa",
                               "path": write_json(tmp_path / "m.json", mid)}])
    run(cfg)
    rows = read_rows(cfg)
    assert len(rows) == 3 and {r["source"] for r in rows} == {"vqa"}
    st = source_stats(cfg)
    assert st["vqa"]["duplicate"] == 1 and st["lmeyemid"]["duplicate"] == 1 and st["lmeyemid"]["kept"] == 0
    assert_adds_up(cfg)
    nodedupe = make_cfg(tmp_path, cfg.instruct.model_dump(mode="json")["sources"], dedupe=False,
                        output=str(tmp_path / "nd"))
    run(nodedupe)
    assert len(read_rows(nodedupe)) == 5


def test_weight_and_cap(world, tmp_path):
    recs = [{"image": name, "question": f"q{k}", "answer": "a"} for name in world["names"][:10] for k in range(20)]
    path = write_json(tmp_path / "v.json", recs)
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "name": "half", "path": path, "weight": 0.5},
                              {"kind": "vqa", "name": "capped", "path": path, "cap": 7, "task": "vqa2"}], dedupe=False)
    run(cfg)
    st = source_stats(cfg)
    assert 60 < st["half"]["kept"] < 140 and st["half"]["sampled_out"] == 200 - st["half"]["kept"]
    assert st["capped"]["kept"] == 7 and st["capped"]["over_cap"] == 193
    assert_adds_up(cfg)


# ---------------------------------------------------------------------------------------------
# bad input


def test_malformed_jsonl_line_errors_naming_file_and_line(world, tmp_path):
    n = world["names"][0]
    path = write_jsonl(tmp_path / "v.jsonl", [{"image": n, "question": "q", "answer": "a"}, '{"image": "x", "question": ',
                                             {"image": n, "question": "q2", "answer": "a"}])
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": path}])
    with pytest.raises(UserError, match=r"v\.jsonl: line 2: not valid JSON"):
        run(cfg)
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": path}], on_bad_record="skip")
    summary = run(cfg)
    st = source_stats(cfg)["vqa"]
    assert st["input"] == 3 and st["malformed"] == 1 and st["kept"] == 2
    assert any("line 2" in note for note in summary.notes)
    assert summary.failures["vqa: malformed"] == 1


def test_malformed_json_list_record(world, tmp_path):
    n = world["names"][0]
    good = json.dumps({"image": n, "question": "q", "answer": "a"})
    text = ("[" + good + ', {"image": "x", "question": nope}, ' + good.replace('"q"', '"q3"') + ', 17, {"image": "x"}, '
            + good.replace('"q"', '"q4"') + ", " + good.replace('"q"', '"q5"') + "]")
    path = tmp_path / "v.json"
    path.write_text(text)
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": str(path)}])
    with pytest.raises(UserError, match=r"v\.json: record 1: not valid JSON"):
        run(cfg)
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": str(path)}], on_bad_record="skip")
    run(cfg)
    st = source_stats(cfg)["vqa"]
    assert st["input"] == 7 and st["malformed"] == 3 and st["kept"] == 4  # bad JSON, not an object, missing keys
    assert_adds_up(cfg)


def test_missing_field_names_record(world, tmp_path):
    path = write_json(tmp_path / "v.json", [{"image": "a.jpg", "question": "q"}])
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": path}])
    with pytest.raises(UserError, match=r"v\.json: record 0: missing 'answer'"):
        run(cfg)
    llava = write_json(tmp_path / "l.json", [{"image": "a.jpg", "conversations": [{"from": "human"}]}])
    cfg = make_cfg(tmp_path, [{"kind": "llava", "path": llava}])
    with pytest.raises(UserError, match=r"l\.json: record 0: conversations\[0\]"):
        run(cfg)


def test_not_a_list_is_always_an_error(world, tmp_path):
    path = write_json(tmp_path / "v.json", {"rows": [], "info": {"questions": []}})
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": path}], on_bad_record="skip")
    with pytest.raises(UserError, match=r"v\.json: expected a JSON list of records, or an object holding one under "
                                        r"'annotations' or 'questions' .*found an object with 'rows', 'info'"):
        run(cfg)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_streaming_json_reader_across_buffer_boundaries(tmp_path, chunk):
    value = [{"a": "x, ] } \" [", "n": 12345}, [1, [2, 3]], "s", 123456789, {"b": {"c": []}}, None]
    path = tmp_path / "x.json"
    text = json.dumps(value, indent=2)
    text = text[:-1] + ', {"bad": tru}, 5]'
    path.write_text(text)
    got = list(iter_records(str(path), chunk_chars=chunk))
    assert [r for _, r in got[:6]] == value
    assert isinstance(got[6][1], Malformed) and got[6][0] == "record 6"
    assert got[7] == ("record 7", 5)


def test_unknown_source_key_and_duplicate_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="instruct.sources.0.vqa.question_col: unknown key"):
        load_config(None, {"instruct.sources": [{"kind": "vqa", "path": "x", "question_col": "q"}]})
    with pytest.raises(ConfigError, match="duplicate source name 'vqa'"):
        load_config(None, {"instruct.sources": [{"kind": "vqa", "path": "x"}, {"kind": "vqa", "path": "y"}]})
    with pytest.raises(ConfigError, match="path is required"):
        load_config(None, {"instruct.sources": [{"kind": "llava"}]})


def test_features_required_and_optional(tmp_path, make_pairs):
    make_pairs(num_images=4)
    cfg = make_cfg(tmp_path, [{"kind": "captions"}])
    with pytest.raises(FileNotFoundError, match=r"instruct.features: no features table at .*require_features: false"):
        run(cfg)
    cfg = make_cfg(tmp_path, [{"kind": "captions"}], require_features=False)
    summary = run(cfg)
    assert summary.rows == 5  # 4 good + the corrupt row (status success); the failed download is rejected
    assert any("features NOT checked" in n for n in summary.notes)
    assert Manifest.load(cfg.instruct.output).stats["features_checked"] is False


# ---------------------------------------------------------------------------------------------
# resume, HF, CLI


def test_rerun_skips_and_killed_run_resumes(world, tmp_path):
    recs = [{"image": name, "question": f"q{k}", "answer": "a"} for name in world["names"][:10] for k in range(3)]
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}], partition_mb=0.0005)
    first = run(cfg)
    before = read_rows(cfg)
    m = Manifest.load(cfg.instruct.output)
    parts, shards = m.stats["partitions"], len(m.shards)
    assert parts > 1 and first.shards_done == shards
    assert all(info.rows > 0 for info in m.shards.values())  # never a 0-row shard
    again = run(cfg)
    assert again.shards_done == 0 and again.shards_skipped == shards and again.rows == first.rows
    # a killed run: one shard missing and the manifest not complete
    out = Path(cfg.instruct.output)
    victim = sorted(out.glob("train-*.parquet"))[0]
    victim.unlink()
    m = Manifest.load(str(out))
    m.complete = False
    m.save(str(out))
    resumed = run(cfg)
    victim_partition = [n for n in m.shards if n.split("-")[1] == victim.name.split("-")[1]]
    assert resumed.shards_done == len(victim_partition) and resumed.shards_skipped == shards - len(victim_partition)
    assert read_rows(cfg) == before
    assert_adds_up(cfg)
    # changed input: refused unless told to overwrite, then everything is redone
    write_json(tmp_path / "v.json", recs[:-1])
    with pytest.raises(TableMismatch, match="built from other inputs"):
        run(cfg)
    with overwriting():
        redo = run(cfg)
    assert redo.rows == first.rows - 1


def test_the_driver_moves_under_1_percent_of_the_tables_bytes(world, tmp_path):
    """Workers read the sources and write the shards; the driver reads metadata (manifests,
    file sizes, templates) and records shards. Measured as this process's read()/write() bytes
    (``lingcloud_testing.process_io``) around the run, against the bytes of the table it made."""
    run(make_cfg(tmp_path, [{"kind": "captions"}], output=str(tmp_path / "warm")))  # Ray and lazy imports: not the run's
    src = write_vqa_file(tmp_path / "big.json", world["names"][:10], 60_000)
    cfg = make_cfg(tmp_path, [{"kind": "captions"}, {"kind": "vqa", "path": src}], val_fraction=0.1)
    before = process_io()
    summary = run(cfg)
    moved = io_delta(before, process_io())
    table_bytes = sum(s.bytes for s in Manifest.load(cfg.instruct.output).shards.values())
    assert summary.rows == 60_010 and table_bytes > 3_000_000  # rows, not fixed metadata, make its bytes
    print(f"driver bytes {moved} against {table_bytes} table bytes: {(moved['rchar'] + moved['wchar']) / table_bytes:.4%}")
    assert moved["rchar"] + moved["wchar"] < 0.01 * table_bytes, (moved, table_bytes)


def test_hf_load_dataset_and_export(world, tmp_path):
    import datasets

    cfg = make_cfg(tmp_path, [{"kind": "captions"}], val_fraction=0.5)
    run(cfg)
    ds = datasets.load_dataset("parquet", data_dir=cfg.instruct.output, cache_dir=str(tmp_path / "hfcache"))
    rows = read_rows(cfg)
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows + ds["validation"].num_rows == len(rows)
    assert ds["train"][0]["conversation"][0]["role"] == "user"
    out = tmp_path / "hf"
    assert main(["instruct", "--set", f"data.root={tmp_path}", "--set", "instruct.val_fraction=0.5",
                 "--export-hf", str(out)]) == 0
    back = datasets.load_from_disk(str(out))
    assert isinstance(back, datasets.DatasetDict)
    assert sorted(list(back["train"]["sample_id"]) + list(back["validation"]["sample_id"])) == sorted(r["sample_id"] for r in rows)


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    path = write_jsonl(tmp_path / "v.jsonl", ["{oops"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"data:\n  root: {tmp_path}\ninstruct:\n  sources:\n    - kind: vqa\n      path: {path}\n")
    assert main(["instruct", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "v.jsonl: line 1: not valid JSON" in err


def test_demo_config_section_builds_from_the_demo_corpus(tmp_path, make_pairs):
    """configs/demo.yaml's instruct section, on a pairs table of the demo corpus's images."""
    root = Path(__file__).resolve().parents[2]
    pairs_path, pairs = make_pairs(num_images=8, corrupt=0, failed=0)
    write_corpus(tmp_path / "corpus", num_images=8)
    write_features(tmp_path / "features", pairs["uid"].to_pylist())
    cfg = load_config(root / "configs" / "demo.yaml", [f"data.root={tmp_path}"])
    summary = run(cfg)
    st = source_stats(cfg)
    assert st["demo_captions"]["kept"] == 8 and st["demo_vqa"]["kept"] == st["demo_vqa"]["input"] > 8
    assert summary.ok and summary.rows == st["demo_captions"]["kept"] + st["demo_vqa"]["kept"]


def test_missing_inputs_are_named_before_any_work(tmp_path):
    cfg = make_cfg(tmp_path, [{"kind": "captions"}], require_features=False)
    with pytest.raises(FileNotFoundError, match=r"no pairs table at .*pairs; run `lmeye download` first"):
        run(cfg)
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": str(tmp_path / "nope.json")}], require_features=False)
    with pytest.raises(FileNotFoundError, match=r"nope.json: no such file"):
        run(cfg)
    assert Manifest.load(cfg.instruct.output) is None  # nothing was started


# ---------------------------------------------------------------------------------------------
# instruction data as released (issue 7)


def test_text_only_llava_records_are_kept_with_a_null_uid(world, tmp_path):
    n0 = world["names"][0]
    recs = [{"id": "img", "image": n0, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Shapes."}]},
            {"id": "txt-1", "conversations": [{"from": "human", "value": "Write a haiku."}, {"from": "gpt", "value": "Snow on the pine."}]}]
    path = write_json(tmp_path / "llava.json", recs)
    cfg = make_cfg(tmp_path, [{"kind": "llava", "path": path}], val_fraction=0.0)
    summary = run(cfg)
    rows = {r["source_id"]: r for r in read_rows(cfg)}
    assert set(rows) == {"img", "txt-1"}
    text = rows["txt-1"]
    assert text["uid"] is None and text["task"] == "text_conversation"  # no image, no feature check
    assert text["conversation"][1]["content"] == "Snow on the pine."
    assert rows["img"]["uid"] is not None and rows["img"]["task"] == "conversation"
    assert any("1 text-only" in n for n in summary.notes)
    # a source option leaves them out
    cfg = make_cfg(tmp_path, [{"kind": "llava", "path": path, "text_only": False}], output=str(tmp_path / "no_text"))
    run(cfg)
    assert [r["source_id"] for r in read_rows(cfg)] == ["img"]
    assert source_stats(cfg)["llava"]["rejected"] == {"no_image": 1}


def test_one_empty_reply_drops_only_its_turn_pair(world, tmp_path):
    n0 = world["names"][0]
    rec = {"id": "7", "image": n0, "conversations": [
        {"from": "human", "value": "Q1?"}, {"from": "gpt", "value": "A1."},
        {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "   "},
        {"from": "human", "value": "Q3?"}, {"from": "gpt", "value": "A3."}]}
    cfg = make_cfg(tmp_path, [{"kind": "llava", "path": write_json(tmp_path / "l.json", [rec])}])
    summary = run(cfg)
    (row,) = read_rows(cfg)
    assert [t["content"] for t in row["conversation"]] == ["Q1?", "A1.", "Q3?", "A3."]
    st = source_stats(cfg)["llava"]
    assert st["kept"] == 1 and st["rejected"] == {} and st["dropped_turns"] == {"empty_answer": 1}
    assert any("1 empty_answer" in n for n in summary.notes)


@pytest.mark.parametrize("text, expected", [
    ("Look at <image> and tell me", "Look at and tell me"),
    ("<image>\nWhat is this?", "What is this?"),
    ("What is this?\n<image>", "What is this?"),
    ("Compare<image>and<image> <image> this", "Compare and this"),
    ("Line one\n<image>\nLine two", "Line one\nLine two"),
    ("no token here ", "no token here"),
])
def test_image_token_is_stripped_without_gluing_words(text, expected):
    from pipelines.instruct.records import strip_image_token

    assert strip_image_token(text) == expected


def test_source_id_traces_a_row_to_its_record(world, tmp_path):
    n = world["names"]
    recs = [{"image": n[0], "question": "q0", "answer": "a", "id": 41}, {"image": n[1], "question": "q1", "answer": "a"}]
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}], val_fraction=0.0)
    run(cfg)
    by_q = {r["conversation"][0]["content"]: r["source_id"] for r in read_rows(cfg)}
    assert by_q == {"q0": "41", "q1": "v.json:record 1"}


def test_lmeyemid_default_image_key_matches_released_file_names(tmp_path):
    """OCR-VQA names are ISBNs: 000100039X.jpg is not a number, 0618127453.jpg is not 618127453.jpg."""
    from schemas.pairs import PAIRS

    urls = ["http://x.example/ocr/000100039X.jpg", "http://x.example/ocr/0618127453.jpg", "http://x.example/ocr/618127453.jpg"]
    w = TableWriter(str(tmp_path / "pairs"), PAIRS, config={})
    w.write("00000.parquet", pa.Table.from_pylist([dict(uid=uid_for(u), url=u, caption="c", status="success") for u in urls],
                                                  schema=PAIRS.schema))
    w.finalize(["00000.parquet"], stats={})
    write_features(tmp_path / "features", [uid_for(u) for u in urls])
    recs = [{"question": f"Who wrote {name}?", "answer": "x", "image_path": f"ocr_vqa/images/{name}", "chunk_belong": 0}
            for name in ("000100039X.jpg", "0618127453.jpg", "618127453.jpg")]
    cfg = make_cfg(tmp_path, [{"kind": "lmeyemid", "path": write_json(tmp_path / "m.json", recs)}])
    run(cfg)
    got = {r["conversation"][0]["content"].split()[-1][:-1]: r["uid"] for r in read_rows(cfg)}
    assert got == {"000100039X.jpg": uid_for(urls[0]), "0618127453.jpg": uid_for(urls[1]), "618127453.jpg": uid_for(urls[2])}
    assert source_stats(cfg)["lmeyemid"]["rejected"] == {}


def test_identical_records_get_unique_sample_ids_without_dedupe(world, tmp_path):
    n0 = world["names"][0]
    recs = [{"image": n0, "question": "Q?", "answer": "A"}] * 3
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}], dedupe=False)
    run(cfg)
    ids = [r["sample_id"] for r in read_rows(cfg)]
    assert len(ids) == 3 and len(set(ids)) == 3


# ---------------------------------------------------------------------------------------------
# caption tasks teach different skills (issue 7)


def test_grounded_questions_ask_what_the_caption_states(tmp_path, make_pairs):
    from lmeye.demo.corpus import generate_items

    pairs_path, pairs = make_pairs(num_images=12, corrupt=0, failed=0)
    write_features(tmp_path / "features", pairs["uid"].to_pylist())
    items = {uid_for(f"http://127.0.0.1/images/{i.name}"): i for i in generate_items(12, seed=0)}
    cfg = make_cfg(tmp_path, [{"kind": "captions", "tasks": {"grounded_qa": 1}}])
    run(cfg)
    rows = read_rows(cfg)
    assert len(rows) == 12 and {r["task"] for r in rows} == {"grounded_qa"}
    kinds = set()
    for r in rows:
        item = items[r["uid"]]
        question, answer = r["conversation"][0]["content"], r["conversation"][1]["content"]
        assert item.caption not in answer and "what can you see" not in question.lower()  # not a rephrased caption
        q = question.lower()
        if "background" in q:
            kinds.add("background")
            assert item.background in answer.lower()
        elif q.startswith(("what colour", "which colour", "tell me the colour")):
            kinds.add("colour")
            shape = next(s for s, _, _ in item.objects if f" {s}" in q)
            assert answer.lower().rstrip(".").split()[-1] == next(c for s, c, _ in item.objects if s == shape)
        else:
            kinds.add("position")
            shape, colour, position = next(o for o in item.objects if f"{o[1]} {o[0]}" in q)
            assert position in answer.lower()
    assert kinds >= {"colour", "position", "background"}


def test_grounded_qa_counts_and_falls_back_without_facts(tmp_path):
    from pipelines.instruct.captions import CaptionTasks, facts

    assert [(f.kind, f.object, f.answer) for f in facts("Two dogs sitting next to three cats.")] == [
        ("count", "dogs", "two"), ("count", "cats", "three")]
    tpl = load_templates(str(CAPTIONS), ["short_caption", "grounded_qa"])
    tasks = CaptionTasks(tpl, {"grounded_qa": 1.0, "short_caption": 0.0001}, 0, None)
    task, turns = tasks.make("u", "A man riding a horse on a beach.")  # no colour, count or position stated
    assert task == "short_caption" and turns[1][1] == "A man riding a horse on a beach."
    assert CaptionTasks(tpl, {"grounded_qa": 1.0}, 0, None).make("u", "A man riding a horse.") is None


# ---------------------------------------------------------------------------------------------
# complete inputs only (issue 7)


def _unfinish(table: Path, drop_one: bool = True) -> None:
    """Make a table look like its stage was killed: manifest not complete, one shard missing."""
    m = Manifest.load(str(table))
    m.complete = False
    m.save(str(table))
    if drop_one:
        sorted(table.glob("*.parquet"))[-1].unlink()


def test_incomplete_inputs_are_refused_unless_allowed(world, tmp_path, capsys):
    _unfinish(tmp_path / "pairs")
    cfg = make_cfg(tmp_path, [{"kind": "captions"}])
    with pytest.raises(SchemaError, match=r"pairs/_manifest.json: the pairs table is incomplete.*--allow-incomplete"):
        run(cfg)
    assert Manifest.load(cfg.instruct.output) is None  # refused before any work
    assert main(["instruct", "--set", f"data.root={tmp_path}"]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert main(["instruct", "--set", f"data.root={tmp_path}", "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE pairs table read" in out and "1 finished shard(s) of 2 listed" in out
    m = Manifest.load(cfg.instruct.output)
    assert m.complete and len(m.stats["incomplete_inputs"]) == 1 and "pairs" in m.stats["incomplete_inputs"][0]
    assert m.stats["sources"]["captions"]["input"] == 7  # the finished shard's rows only


def test_incomplete_features_and_schema_mismatch_are_refused(world, tmp_path):
    _unfinish(tmp_path / "features", drop_one=False)
    cfg = make_cfg(tmp_path, [{"kind": "captions"}])
    with pytest.raises(SchemaError, match=r"features/_manifest.json: the features table is incomplete"):
        run(cfg)
    m = Manifest.load(str(tmp_path / "features"))
    m.complete, m.schema_version = True, 99
    m.save(str(tmp_path / "features"))
    with pytest.raises(SchemaError, match=r"features schema version 99, this code reads version"):
        run(cfg)
    # a shard whose columns are not the contract's: named by file and column
    m.schema_version = FEATURES.version
    m.save(str(tmp_path / "features"))
    shard = sorted((tmp_path / "features").glob("*.parquet"))[0]
    pq.write_table(pa.table({"uid": ["x"], "state": ["success"]}), shard)
    with pytest.raises(SchemaError, match=r"train-00000.parquet: features table is missing column 'status'"):
        run(cfg)


def test_a_table_path_that_is_a_file_is_one_line(world, tmp_path):
    shard = sorted((tmp_path / "pairs").glob("*.parquet"))[0]
    cfg = make_cfg(tmp_path, [{"kind": "captions"}], pairs=str(shard))
    with pytest.raises(NotATableFolder, match="is a file, not a table folder"):
        run(cfg)


def test_empty_validation_split_has_no_shard_and_exports(world, tmp_path):
    import datasets

    cfg = make_cfg(tmp_path, [{"kind": "captions"}], val_fraction=0.0)
    run(cfg)
    out = Path(cfg.instruct.output)
    assert not list(out.glob("validation-*")) and all(i.rows for i in Manifest.load(str(out)).shards.values())
    assert list(split_files(str(out))) == ["train"]
    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hfcache"))
    assert list(ds) == ["train"] and ds["train"].num_rows == 10
    assert main(["instruct", "--set", f"data.root={tmp_path}", "--set", "instruct.val_fraction=0",
                 "--export-hf", str(tmp_path / "hf")]) == 0
    assert datasets.load_from_disk(str(tmp_path / "hf"))["train"].num_rows == 10


def test_sigkilled_run_resumes_to_the_same_table(world, tmp_path):
    """`jobs/instruct.py` killed with SIGKILL in its partition phase; the rerun finishes the table
    and it is identical, row for row, to an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    recs = [{"image": name, "question": f"q{k}", "answer": f"a{k}"} for name in world["names"][:10] for k in range(6)]
    sources = [{"kind": "vqa", "path": write_json(tmp_path / "v.json", recs)}, {"kind": "captions"}]
    settings = {"partition_mb": 0.0005, "val_fraction": 0.3, "tmp_dir": str(tmp_path)}
    reference = make_cfg(tmp_path, sources, output=str(tmp_path / "reference"), **settings)
    run(reference)
    killed = make_cfg(tmp_path, sources, output=str(tmp_path / "killed"), **settings)
    parts = Manifest.load(reference.instruct.output).stats["partitions"]
    assert parts >= 4

    sets = [f"data.root={tmp_path}", f"instruct.output={killed.instruct.output}", "instruct.debug_delay_s=30",
            f"instruct.sources={json.dumps(sources)}"] + [f"instruct.{k}={v}" for k, v in settings.items()]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, str(root / "jobs" / "instruct.py"), *sum((["--set", s] for s in sets), [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            m = Manifest.load(killed.instruct.output)
            if m is not None and m.shards:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # mid partition phase: one partition written, the rest not
    finally:
        proc.wait()
    m = Manifest.load(killed.instruct.output)
    assert not m.complete and 0 < len(m.shards) < len(Manifest.load(reference.instruct.output).shards)

    resumed = run(killed)
    assert resumed.shards_skipped == len(m.shards) and resumed.shards_done > 0
    assert read_rows(killed) == read_rows(reference)
    assert Manifest.load(killed.instruct.output).stats == Manifest.load(reference.instruct.output).stats


# ---------------------------------------------------------------------------------------------
# COCO and VQAv2 files as released


def _coco_captions_file(path: Path, ids: list[int]) -> str:
    """captions_train2017.json's layout: info, licenses, images, then the caption annotations."""
    value = {
        "info": {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution"}],
        "images": [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
                    "height": 32, "width": 32, "date_captured": "2013-11-14 11:18:45", "id": i} for i in ids],
        "annotations": [{"image_id": i, "id": 1000 * i + k, "caption": f"Image {i}, caption {k}: a shape."}
                        for i in ids for k in range(2)],
    }
    return write_json(path, value)


def test_coco_captions_json_as_released(coco_world, tmp_path):
    uids = coco_world["pairs"]["uid"].to_pylist()
    path = _coco_captions_file(tmp_path / "captions_train2017.json", [1, 2, 3])
    cfg = make_cfg(tmp_path, [{"kind": "captions", "name": "coco_captions", "path": path, "image_field": "image_id",
                               "image_key": "coco_id", "tasks": {"short_caption": 1.0}}])
    run(cfg)
    rows = read_rows(cfg)
    assert len(rows) == 6 and {r["uid"] for r in rows} == set(uids[1:4])
    assert {r["source_id"] for r in rows} == {f"captions_train2017.json:annotations record {k}" for k in range(6)}
    st = source_stats(cfg)["coco_captions"]
    assert st["input"] == 6 and st["kept"] == 6  # the annotations only: the images list is skipped
    assert_adds_up(cfg)


def test_vqav2_questions_and_annotations_as_released(coco_world, tmp_path):
    uids = coco_world["pairs"]["uid"].to_pylist()
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", {
        "info": {"description": "VQA v2"}, "task_type": "Open-Ended", "data_type": "mscoco",
        "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}, "data_subtype": "train2014",
        "questions": [{"image_id": 4, "question": "What color is the shape?", "question_id": 4000},
                      {"image_id": 5, "question": "How many shapes are there?", "question_id": 5000},
                      {"image_id": 6, "question": "Is it unanswered?", "question_id": 6000}],
    })
    answers = write_json(tmp_path / "v2_mscoco_train2014_annotations.json", {
        "info": {"description": "VQA v2"}, "license": {"name": "CC BY 4.0"}, "data_subtype": "train2014",
        "annotations": [
            {"question_type": "what color is the", "multiple_choice_answer": "red", "image_id": 4, "answer_type": "other",
             "question_id": 4000, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                              for k, a in enumerate(["red"] * 7 + ["orange"] * 3)]},
            {"question_type": "how many", "multiple_choice_answer": "2", "image_id": 5, "answer_type": "number",
             "question_id": 5000, "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]},
        ],
    })
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "name": "vqav2", "path": questions, "answers": answers,
                               "image_field": "image_id", "id_field": "question_id", "image_key": "coco_id"}])
    run(cfg)
    got = {(r["uid"], r["conversation"][0]["content"], r["conversation"][1]["content"], r["source_id"]) for r in read_rows(cfg)}
    assert got == {(uids[4], "What color is the shape?", "red", "4000"), (uids[5], "How many shapes are there?", "2", "5000")}
    st = source_stats(cfg)["vqav2"]
    assert st["rejected"] == {"no_annotation": 1} and st["kept"] == 2
    assert_adds_up(cfg)


def test_coco_id_takes_only_cocos_own_names(coco_world, tmp_path):
    """LMEyeMID mixes Flickr30k, GQA and TextCaps with COCO: their names are never COCO ids."""
    uids = coco_world["pairs"]["uid"].to_pylist()
    coco = [{"image": "COCO_train2014_000000000001.jpg", "question": "q1", "answer": "a"},
            {"image": 2, "question": "q2", "answer": "a"},
            {"image": "train2017/000000000003.jpg", "question": "q3", "answer": "a"}]
    others = [{"image": "1000092795.jpg", "question": "flickr", "answer": "a"},
              {"image": "n161313.jpg", "question": "gqa", "answer": "a"},
              {"image": "0a0bc91825468c45.jpg", "question": "textcaps", "answer": "a"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", coco + others[:2])
    cfg = make_cfg(tmp_path, [{"kind": "lmeyemid", "path": mixed, "image_key": "coco_id", "image_field": "image"}])
    with pytest.raises(UserError, match=r"mixed\.jsonl: line 4: image reference '1000092795\.jpg' is not a COCO image"):
        run(cfg)
    cfg = make_cfg(tmp_path, [{"kind": "lmeyemid", "path": mixed, "image_key": "coco_id", "image_field": "image"}],
                   on_bad_record="skip")
    summary = run(cfg)
    assert sorted(r["uid"] for r in read_rows(cfg)) == sorted(uids[1:4])
    st = source_stats(cfg)["lmeyemid"]
    assert st["kept"] == 3 and st["malformed"] == 2 and "n161313.jpg" in st["malformed_examples"][1]
    assert summary.failures["lmeyemid: malformed"] == 2


def test_a_source_of_mostly_malformed_records_fails_instead_of_yielding_no_rows(coco_world, tmp_path):
    others = [{"image": name, "question": f"q{k}", "answer": "a"}
              for k, name in enumerate(["1000092795.jpg", "n161313.jpg", "0a0bc91825468c45.jpg"])]
    path = write_jsonl(tmp_path / "textcaps.jsonl", others + [{"image": 5, "question": "coco", "answer": "a"}])
    cfg = make_cfg(tmp_path, [{"kind": "vqa", "name": "textcaps", "path": path, "image_key": "coco_id"}], on_bad_record="skip")
    with pytest.raises(UserError, match=r"instruct source 'textcaps': 3 of 4 records are malformed .*max_malformed_fraction 0\.5\)"
                                        r"; the first: .*textcaps\.jsonl: line 1: image reference '1000092795\.jpg'"):
        run(cfg)
    assert Manifest.load(cfg.instruct.output) is None or not Manifest.load(cfg.instruct.output).complete
