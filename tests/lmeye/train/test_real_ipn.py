"""The trainer's data path and validation with the real IPN (lmeye.model), without Ray: rows of an
instructions table -> BatchMaker -> IPN loss and gradients on the stage's parameters only ->
exact-match generation; the factory builds, saves and reads back the model directory."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("lmeye.model")

from lmeye.config import load_config  # noqa: E402
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_tokenizer  # noqa: E402
from lmeye.store import FeatureStore  # noqa: E402
from lmeye.train.data import BatchMaker, llm_tokens  # noqa: E402
from lmeye.train.evaluate import exact_match  # noqa: E402
from lmeye.train.model_factory import IPNFactory  # noqa: E402


def _tables(root: Path):
    spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path(__file__).with_name("fake_ipn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tables(root, n_train=12, n_val=4, missing=(5, 7), too_long=(), dim=FEATURE_DIM, patch=PATCH_SHAPE)


def test_real_ipn_trains_through_the_batch_maker(tmp_path):
    from lmeye.model.demo import build_tiny_llm

    llm = build_tiny_llm(str(tmp_path / "llm"), "llama", tiny_tokenizer())
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    cfg = load_config(None, {"model.llm": llm, "model.clip_model": "lingcloud-tiny-vit", "model.clip_pretrained": clip,
                             "model.max_length": 64})
    factory = IPNFactory()
    t = _tables(tmp_path)
    store = FeatureStore.open(t["features"])
    factory.check(cfg, store)
    ipn = factory.build(cfg, store.dim, store.patch_shape)
    ipn.set_trainable("align")
    trainable = {id(p) for p in ipn.trainable_parameters()}
    rows = [r for r in t["rows"] if r["split"] == "train"]
    table = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "uid", "task", "conversation")} for r in rows])
    prep = BatchMaker(ipn, store).prepare(table)
    assert prep.skipped["missing_features"] == 2 and prep.rows == len(rows) - 2
    # tokens/s counts every token the LLM runs (prefix, slots, suffix), not the answer tokens alone
    encs = [ipn.encode(c, has_image=True) for c in table.column("conversation").to_pylist()[:3]]
    lengths = sum(len(e["prefix_ids"]) + len(e["suffix_ids"]) for e in encs)
    answers = sum(sum(1 for x in e["labels"] if x != -100) for e in encs)
    assert llm_tokens(ipn.collate(encs, np.zeros((3, store.dim), np.float32), np.zeros((3, *store.patch_shape), np.float32))) == lengths > 2 * answers
    out = ipn(prep.batch)
    assert torch.isfinite(out.loss) and out.per_sample_loss.shape == (prep.rows,)
    out.loss.backward()
    for p in ipn.parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in trainable) or p.grad is None
    counts: Counter = Counter()
    val = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "uid", "task", "conversation")} for r in t["rows"] if r["split"] == "validation"])
    exact_match(ipn, BatchMaker(ipn, store), val, "cpu", load_config(None).train.model_copy(update={"precision": "fp32"}), counts)
    assert counts["val_rows"] == 4 and 0 <= counts["val_correct"] <= 4
    ipn.save_pretrained(str(tmp_path / "model"))
    assert factory.feature_shape(str(tmp_path / "model")) == (FEATURE_DIM, PATCH_SHAPE)
    again = factory.load(str(tmp_path / "model"))
    for k, v in ipn.trainable_state_dict().items():
        assert torch.equal(v, again.trainable_state_dict()[k])


def test_workers_load_the_frozen_llm_and_clip_in_the_training_dtype(tmp_path):
    from lmeye.model.demo import build_tiny_llm
    from lmeye.train.data import to_device
    from lmeye.train.model_factory import in_training_dtype, training_dtype

    llm = build_tiny_llm(str(tmp_path / "llm"), "llama", tiny_tokenizer())
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    cfg = load_config(None, {"model.llm": llm, "model.clip_model": "lingcloud-tiny-vit", "model.clip_pretrained": clip,
                             "model.max_length": 64, "train.precision": "bf16"})
    assert cfg.model.dtype == "float32" and training_dtype(cfg) == "bfloat16"
    factory = IPNFactory()
    t = _tables(tmp_path)
    store = FeatureStore.open(t["features"])
    ipn = factory.build(in_training_dtype(cfg), store.dim, store.patch_shape)
    frozen = [p for n, p in ipn.named_parameters() if n.startswith(("llm.", "rvii.tower."))]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}  # loaded so, not cast after an fp32 load
    rows = [r for r in t["rows"] if r["split"] == "train"][:4]
    table = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "uid", "task", "conversation")} for r in rows])
    ipn.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds the module
    out = ipn(to_device(BatchMaker(ipn, store).prepare(table).batch, "cpu", "bf16"))
    assert torch.isfinite(out.loss)
    ipn.float().save_pretrained(str(tmp_path / "model"))
    again = factory.load(str(tmp_path / "model"), dtype=training_dtype(cfg))
    assert again.llm.dtype == torch.bfloat16 and again.rvii.tower.bos_eos.dtype == torch.bfloat16
