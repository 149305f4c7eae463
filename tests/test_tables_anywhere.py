"""Tables open anywhere, with no project code: pandas, polars, DuckDB and HF `datasets` read
every table (pairs, features, instructions) by folder or glob, as the README shows."""

from __future__ import annotations

import numpy as np
import pytest
from lingcloud_testing import build_features_table, build_pairs_table

from lmeye.config import load_config
from lmeye.store import FeatureStore
from lmeye.tables import Manifest
from pipelines.instruct import run

DIM = 4


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """pairs (12 images + 1 corrupt + 1 failed), features (with a serving copy built inside it)
    and instructions whose validation split is empty (val_fraction 0: no 0-row shard may appear)."""
    root = tmp_path_factory.mktemp("anywhere")
    pairs = build_pairs_table(root / "pairs", 12)
    good = [u for u, s, c in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist(), pairs["caption"].to_pylist())
            if s == "success" and c != "not an image"]
    build_features_table(root / "features", good, failed=[pairs["uid"][12].as_py()], dim=DIM)
    FeatureStore.open(str(root / "features"))  # its serving copy (_serving/) lives inside the table folder
    cfg = load_config(None, {"data.root": str(root), "instruct.val_fraction": 0.0})
    run(cfg)
    rows = {name: Manifest.load(str(root / name)).num_rows for name in ("pairs", "features", "instructions")}
    assert rows == {"pairs": 14, "features": 13, "instructions": 12}
    assert Manifest.load(str(root / "instructions")).stats["splits"]["validation"] == 0
    return root, rows


@pytest.mark.parametrize("name", ["pairs", "features", "instructions"])
def test_every_table_opens_with_pandas_polars_duckdb_and_hf(tables, name, tmp_path):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    root, rows = tables
    folder = root / name
    glob = f"{folder}/*.parquet"
    n = rows[name]

    by_pandas = pd.read_parquet(folder)  # the folder (pyarrow skips _manifest.json and _serving/)
    by_polars = pl.read_parquet(glob)
    assert len(by_pandas) == by_polars.height == n
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(n,)]
    assert duckdb.sql(f"SELECT count(*) FROM '{folder}/*.parquet'").fetchall() == [(n,)]
    ds = datasets.load_dataset("parquet", data_dir=str(folder), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and ds["train"].num_rows == n  # no empty split, no manifest read as data

    if name == "features":
        ok = by_pandas[by_pandas["status"] == "success"]
        assert np.stack(ok["embedding"].to_numpy()).shape == (len(ok), DIM)
        assert by_polars.filter(pl.col("status") == "success")["embedding"].to_numpy().shape == (len(ok), DIM)
        assert duckdb.sql(f"SELECT DISTINCT len(embedding) FROM read_parquet('{glob}') WHERE status = 'success'").fetchall() == [(DIM,)]
        hf = ds["train"].filter(lambda r: r["status"] == "success").with_format("numpy")
        assert hf[:]["embedding"].shape == (len(ok), DIM)
