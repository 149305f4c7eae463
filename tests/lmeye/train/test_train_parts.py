"""The trainer's parts without Ray: config, schedule, DeepSpeed dict, batches, checkpoint files, plot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmeye.config import ConfigError, load_config
from lmeye.errors import UserError
from lmeye.store import FeatureStore
from lmeye.train.checkpoint import load_seen, restore_rng, save_rank_files
from lmeye.train.data import BatchMaker, SeenSet
from lmeye.train.ds_config import deepspeed_config, lr_factor
from lmeye.train.evaluate import normalise
from lmeye.train.plot import plot_loss



def _fake():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path(__file__).with_name("fake_ipn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def test_default_stages_are_align_then_instruct_from_align():
    tc = load_config(None).train
    assert [(s.name, s.trainable, s.init_from) for s in tc.stages] == [("align", "align", None), ("instruct", "instruct", "align")]
    assert tc.stages[0].tasks == ["short_caption", "detailed_description", "grounded_qa"] and tc.stages[1].tasks is None


@pytest.mark.parametrize("override, word", [
    ({"train.stages": [{"name": "a", "trainable": "align"}, {"name": "a", "trainable": "instruct"}]}, "duplicate stage name"),
    ({"train.only": ["nope"]}, "no stage named 'nope'"),
    ({"train.zero_stage": 4}, "train.zero_stage"),
    ({"train.stages": [{"name": "a", "trainable": "align", "epoch": 2}]}, "unknown key"),
])
def test_bad_train_config_is_one_line(override, word):
    with pytest.raises(ConfigError, match=word):
        load_config(None, override)


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor("cosine", warmup=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0) and f(100) == pytest.approx(0.0)
    lin = lr_factor("linear", warmup=0, total_steps=10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5)
    assert lr_factor("constant", 0, 10)(7) == 1.0


def test_deepspeed_config_from_the_section():
    cfg = load_config(None, {"train.zero_stage": 3, "train.precision": "bf16", "train.micro_batch_size": 4,
                             "train.grad_accum": 2, "train.grad_clip": 0.5,
                             "train.stages": [{"name": "a", "trainable": "align", "lr": 0.01}]})
    ds = deepspeed_config(cfg.train, cfg.train.stages[0], world_size=2, total_steps=10)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 0.5


def test_batch_maker_skips_counts_and_filters_seen(tmp_path):
    fake = _fake()
    t = fake.build_tables(tmp_path)
    store = FeatureStore.open(t["features"])
    ipn = fake.FakeIPN(store.dim, store.patch_shape)
    maker = BatchMaker(ipn, store)
    train = [r for r in t["rows"] if r["split"] == "train"]
    table = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "uid", "task", "conversation")} for r in train])
    prep = maker.prepare(table)
    assert dict(prep.skipped) == {"missing_features": 2, "too_long": 2}
    assert prep.rows == len(t["trainable"]) and sorted(prep.batch["keys"]) == sorted(t["trainable"])
    assert prep.seen.size == table.num_rows  # skipped rows are seen too
    text_only = prep.batch["keys"].index(train[13]["conversation"][0]["content"])
    assert not bool(prep.batch["has_image"][text_only]) and float(prep.batch["embeddings"][text_only].abs().sum()) == 0
    again = maker.prepare(table, seen=SeenSet(prep.seen[:10]))
    assert again.skipped["resumed_skip"] == 10 and again.seen.size == table.num_rows - 10
    with pytest.raises(UserError, match="no features"):
        BatchMaker(ipn, store, on_missing="error").prepare(table)
    with pytest.raises(UserError, match="max_length"):
        BatchMaker(ipn, store, on_too_long="error").prepare(table.slice(6, 4))


def test_the_seen_filter_is_a_binary_search_not_a_sort_per_batch(tmp_path, monkeypatch):
    """At 1M seen rows np.isin cost ~1.7 s per micro-batch (it sorts every seen id each call); the
    seen set is sorted once and a batch costs a binary search per row."""
    fake = _fake()
    t = fake.build_tables(tmp_path)
    store = FeatureStore.open(t["features"])
    maker = BatchMaker(fake.FakeIPN(store.dim, store.patch_shape), store)
    train = [r for r in t["rows"] if r["split"] == "train"]
    table = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "uid", "task", "conversation")} for r in train])
    keys = maker.prepare(table).seen
    rng = np.random.default_rng(0)
    others = rng.integers(0, 2**63, 200_000, dtype=np.uint64)
    seen = SeenSet(np.concatenate([others, keys[::3]]))  # sorted here, once
    probe = np.concatenate([keys, others[:50], np.array([0, 2**64 - 1], np.uint64)])
    assert (seen.contains(probe) == np.isin(probe, seen.keys)).all()
    def no_sort_of_the_seen_set(name):
        original = getattr(np, name)

        def guarded(*args, **kwargs):
            if any(getattr(a, "size", 0) >= seen.size for a in args):
                pytest.fail(f"np.{name} over the whole seen set in a batch")
            return original(*args, **kwargs)
        return guarded

    for name in ("isin", "unique", "sort", "argsort"):  # nothing per batch re-sorts the seen ids
        monkeypatch.setattr(np, name, no_sort_of_the_seen_set(name))
    again = maker.prepare(table, seen=seen)
    assert again.skipped["resumed_skip"] == keys[::3].size and again.seen.size == table.num_rows - keys[::3].size
    assert not SeenSet().contains(keys).any()


def test_rank_files_round_trip_without_pickle(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_rank_files(str(tmp_path), 0, np.array([3, 1], np.uint64))
    save_rank_files(str(tmp_path), 1, np.array([2, 3], np.uint64))
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(str(tmp_path), 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert load_seen(str(tmp_path)).tolist() == [1, 2, 3]
    assert json.loads((tmp_path / "rng" / "rank1.json").read_text())["torch"]


def test_loss_plot_and_normalise(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)) + "\n")
    assert plot_loss(str(m), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_loss(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png"))
    assert normalise("  Red. ") == "red" and normalise("top  Left") == "top left"


def test_a_stage_without_validation_rows_skips_validation(monkeypatch):
    """A small corpus's uid split can leave a stage's tasks no validation rows: Ray Train then has no
    "validation" shard, and the stage must still finish (it once failed both workers)."""
    import ray.train

    from lmeye.train.evaluate import validate

    def no_shard(name):
        raise KeyError(f"Dataset shard for {name!r} not found")

    monkeypatch.setattr(ray.train, "get_dataset_shard", no_shard)
    assert validate(None, None, None, 4, "cpu", None, None, lockstep=False) == {}


@pytest.mark.parametrize("use_gpu", [False, True])
def test_batches_are_prepared_in_order_in_line_or_one_ahead_in_a_thread(use_gpu):
    import threading
    from types import SimpleNamespace

    from lmeye.train.feed import Feed

    threads = []

    class Maker:
        def prepare(self, table, seen):
            threads.append(threading.current_thread().name)
            return (table, seen)

    seen = np.array([7], np.uint64)
    got = list(Feed(Maker(), use_gpu, seen_prev=seen).prepared(iter(["a", "b", "c"])))
    assert [t for t, _ in got] == ["a", "b", "c"] and all(s is seen for _, s in got)
    # CPU workers prepare on the step's own thread; GPU workers one batch ahead in another
    assert all(n.startswith("lingcloud-batches") for n in threads) == use_gpu
    assert any(n.startswith("lingcloud-batches") for n in threads) == use_gpu


def test_text_lengths_count_every_turns_characters_on_any_table_a_batch_arrives_as():
    """The sort key of group_by_length, in Arrow: characters (not bytes) of every turn's content; a null
    conversation, an empty one and a null content count 0; a slice of a table of several chunks is
    counted from its own first row (list offsets do not start at 0 there)."""
    from lmeye.train.feed import text_lengths

    turns = [None, [], [{"role": "user", "content": None}, {"role": "assistant", "content": "yes"}],
             [{"role": "user", "content": "¿Qué color es el círculo? 日本"}, {"role": "assistant", "content": ""}]]
    convs = [turns[i % 4] if i % 5 else [{"role": "user", "content": "x" * i}] for i in range(300)]
    table = pa.concat_tables([pa.table({"conversation": convs[:120]}), pa.table({"conversation": convs[120:]})])
    for part in (table, table.slice(37, 150), table.slice(119, 3), table.take(pa.array([299, 0, 5, 3]))):
        expected = [sum(len(m["content"] or "") for m in c or ()) for c in part.column("conversation").to_pylist()]
        assert text_lengths(part).tolist() == expected
    assert text_lengths(table)[3] == len("¿Qué color es el círculo? 日本")


def test_group_by_length_uses_every_row_once_in_batches_of_like_length_and_pads_less():
    """train.group_by_length: a table of several micro-batches' rows -> pieces of rows sorted by length,
    in a seeded random order; the demo's mix (1 long multiple-choice prompt in 7) pads far less."""
    from lmeye.train.feed import group_by_length

    rng = random.Random(0)
    sizes = [rng.choice([20, 20, 20, 20, 25, 25, 60]) for _ in range(1000)]
    def table(ids):
        return pa.table({"sample_id": ids, "conversation": [[{"role": "user", "content": "x" * sizes[i]},
                                                             {"role": "assistant", "content": "y"}] for i in ids]})
    tables = [table(list(range(i, min(i + 256, 1000)))) for i in range(0, 1000, 256)]  # the last one short, as an epoch's end is
    pieces = list(group_by_length(tables, 32, seed=3))
    ids = [i for p in pieces for i in p.column("sample_id").to_pylist()]
    assert sorted(ids) == list(range(1000)) and all(p.num_rows <= 32 for p in pieces)
    assert len(pieces) == sum(-(-t.num_rows // 32) for t in tables)  # as many micro-batches as without grouping
    assert [p.column("sample_id").to_pylist() for p in group_by_length(tables, 32, seed=3)] == [p.column("sample_id").to_pylist() for p in pieces]
    assert [p.column("sample_id").to_pylist() for p in group_by_length(tables, 32, seed=4)] != [p.column("sample_id").to_pylist() for p in pieces]
    padded = sum(32 * max(sizes[i] for i in p.column("sample_id").to_pylist()) for p in pieces)
    plain = sum(32 * max(sizes[i:i + 32]) for i in range(0, 1000, 32))
    print(f"padded characters, grouped / not: {padded / plain:.2f}")
    assert padded < 0.6 * plain


def test_on_the_embedded_ray_trainers_start_no_placement_group_cleaner():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train import _trainer_class

    def callbacks(cls) -> list[str]:
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    assert _trainer_class(embedded=False) is TorchTrainer
    on_a_cluster, embedded = callbacks(TorchTrainer), callbacks(_trainer_class(embedded=True))
    assert "PlacementGroupCleanerCallback" in on_a_cluster  # Ray Train's, where a dashboard serves its state API
    assert embedded == [name for name in on_a_cluster if name != "PlacementGroupCleanerCallback"]


@pytest.mark.parametrize("on", [False, True])
def test_a_worker_recomputes_the_llms_activations_when_the_config_says_so(tmp_path, monkeypatch, on):
    """``train.activation_checkpointing`` reaches the worker's IPN (``IPN.recompute_activations``)."""
    import ray.train
    from types import SimpleNamespace

    from lmeye.config import dump_config
    from lmeye.train import loop

    fake = _fake()
    tables = fake.build_tables(tmp_path, n_train=8, n_val=2)
    calls = []

    class Factory(fake.FakeFactory):
        def build(self, cfg, feature_dim, patch_shape):
            ipn = super().build(cfg, feature_dim, patch_shape)
            ipn.recompute_activations = lambda: calls.append("recompute")
            return ipn

    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(loop.Engine, "initialize", classmethod(lambda cls, *a, **k: SimpleNamespace(device="cpu")))
    cfg = load_config(None, {"train.activation_checkpointing": on, "train.precision": "fp32"})
    store = FeatureStore.open(str(tables["features"]))
    worker = loop.Worker.start({
        "cfg": dump_config(cfg), "stage": cfg.train.stages[1].model_dump(mode="json"), "factory": Factory(),
        "features": store.path, "features_version": store.version, "init_dir": None, "total_steps": 4,
        "metrics_path": str(tmp_path / "metrics.jsonl"),
    })
    assert calls == (["recompute"] if on else []) and worker.ipn is not None
