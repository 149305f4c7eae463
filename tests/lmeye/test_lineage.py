"""`lmeye lineage`: the chain checkpoint -> features -> pairs -> URL list, from recorded provenance.

Tables are written in-process (no Ray) under the same provenance recording the stages run in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from lingcloud_testing import build_pairs_table

from lmeye import provenance
from lmeye.cli import main
from lmeye.config import load_config
from lmeye.lineage import CHECKPOINT_LINEAGE, lineage, write_checkpoint_lineage
from lmeye.stages import STAGES, record_for
from lmeye.tables import Manifest, TableWriter, shard_file
from schemas.features import FEATURES, SUCCESS, features_schema

REPO = Path(__file__).resolve().parents[2]


def write_features(path: Path, pairs: Path, cfg) -> None:
    """A small features table derived shard by shard from ``pairs``, as the extract stage records it."""
    schema = features_schema(4, "float32")
    source = Manifest.load(str(pairs))
    with provenance.recording(str(path), record_for(STAGES["extract"], cfg)):
        writer = TableWriter(str(path), FEATURES, config={"model": "fake"})
    for name, info in sorted(source.shards.items()):
        uids = pa.parquet.read_table(pairs / shard_file(name), columns=["uid"])["uid"].to_pylist()
        emb = np.ones((len(uids), 4), np.float32)
        table = pa.table({
            "uid": uids, "status": [SUCCESS] * len(uids), "error_message": pa.nulls(len(uids), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 4),
        }).cast(schema)
        writer.write(name, table, inputs=[name], input_fingerprint=info.sha256)
    writer.finalize(sorted(source.shards), stats={})


@pytest.fixture
def chain(tmp_path):
    root = tmp_path / "data"
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1/a.jpg,a\n")
    cfg = load_config(None, {"data.root": str(root), "download.input": str(urls)})
    with provenance.recording(str(root / "pairs"), record_for(STAGES["download"], cfg)):
        build_pairs_table(root / "pairs", 6, shards=2)
    write_features(root / "features", root / "pairs", cfg)
    ckpt = tmp_path / "train" / "align"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    write_checkpoint_lineage(str(ckpt), cfg, extra_inputs={"features": str(root / "features")})
    return {"root": root, "urls": urls, "ckpt": ckpt, "cfg": cfg}


def test_chain_from_a_checkpoint_to_the_url_list(chain, capsys):
    root = chain["root"]
    assert main(["lineage", str(chain["ckpt"]), "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)
    assert (ckpt["kind"], ckpt["stage"]) == ("checkpoint", "train")
    assert set(ckpt["shards"]) == {"model.safetensors"}
    [features] = ckpt["inputs"]
    assert (features["role"], features["kind"], features["stage"], features["table"]) == ("features", "table", "extract", "features")
    assert features["recorded"] and features["changed_since"] is False
    assert features["config_fingerprint"] == Manifest.load(str(root / "features")).config_fingerprint
    assert features["code_version"] and features["built"] > 0
    # each features shard names the pairs shard it came from, and that table
    assert features["shards"]["00001.parquet"]["inputs"] == [{"shard": "00001.parquet", "table": str(root / "pairs")}]
    [pairs] = features["inputs"]
    assert (pairs["role"], pairs["stage"], pairs["path"]) == ("pairs", "download", str(root / "pairs"))
    [urls] = pairs["inputs"]
    assert (urls["role"], urls["kind"], urls["path"], urls["changed_since"]) == ("urls", "files", str(chain["urls"]), False)


def test_text_form_and_a_changed_input(chain, capsys):
    root = chain["root"]
    # rewrite one pairs shard: the features table was built from the old version
    with provenance.recording(str(root / "pairs"), record_for(STAGES["download"], chain["cfg"])):
        build_pairs_table(root / "pairs", 7, shards=2)
    assert main(["lineage", str(root / "features")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"{root / 'features'}  [table features, stage extract, complete]")
    assert "00000.parquet  sha256 " in out and "<- 00000.parquet" in out
    pairs_line = next(line for line in lines if "pairs: " in line)
    assert "stage download" in pairs_line and "CHANGED since it was read" in pairs_line
    assert any(line.lstrip(" └─").startswith("urls: ") for line in lines)


def test_tables_without_provenance_infer_inputs_from_the_layout(tmp_path):
    build_pairs_table(tmp_path / "pairs", 4, shards=2)  # no recording: an older table
    write_features(tmp_path / "features", tmp_path / "pairs", load_config(None, {"data.root": str(tmp_path)}))
    m = Manifest.load(str(tmp_path / "features"))
    m.provenance = {}
    m.save(str(tmp_path / "features"))
    node = lineage(str(tmp_path / "features"))
    assert node.stage == "extract" and not node.recorded
    assert [(c.role, c.path, c.kind) for c in node.inputs] == [("pairs", str(tmp_path / "pairs"), "table")]


def test_not_a_table_is_one_line(tmp_path, capsys):
    assert main(["lineage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and CHECKPOINT_LINEAGE in err


def test_checkpoint_lineage_json_convention(chain):
    record = json.loads((chain["ckpt"] / CHECKPOINT_LINEAGE).read_text())
    assert set(record) == {"kind", "provenance", "config_fingerprint", "code_version", "built", "files", "version"}
    assert record["provenance"]["inputs"]["features"] == str(chain["root"] / "features")
    assert record["files"] == {"model.safetensors": __import__("hashlib").sha256(b"weights").hexdigest()}
