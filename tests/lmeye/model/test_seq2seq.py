"""The IPN around an encoder-decoder LLM (T5 / FlanT5): a tiny random T5ForConditionalGeneration with a
SentencePiece (unigram) tokenizer in T5's released layout (lmeye.model.released)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, QA, batch_of, features, tiny_model_config
from lmeye.model.text import IGNORE, IMG, IMG_D, IMG_Q

CONV = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}]


@pytest.fixture(scope="module")
def t5_cfg(released, clip_checkpoint):
    def make(**kw):
        return tiny_model_config(released["t5"], clip_checkpoint, chat_template="plain", num_img_d=3, **kw)

    return make


@pytest.fixture(scope="module")
def t5(t5_cfg):
    from lmeye.model import build_ipn

    torch.manual_seed(1)
    ipn = build_ipn(t5_cfg(), FEATURE_DIM, PATCH_SHAPE)
    with torch.no_grad():  # non-zero transmission: the <img-d> slots depend on the request and the image
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    return ipn


def test_encoder_input_and_target_are_t5s_own_tokenisation(t5):
    from lmeye.model.seq2seq import Seq2SeqIPN

    assert isinstance(t5, Seq2SeqIPN) and t5.llm.config.is_encoder_decoder
    tok = t5.tokenizer
    enc = t5.encode(CONV, has_image=True)
    assert enc["prefix_ids"].count(IMG) == 1 and enc["prefix_ids"][-1] == IMG_Q and enc["suffix_ids"][:3] == [IMG_D] * 3
    assert set(enc["labels"]) == {IGNORE}  # the encoder carries no loss
    prompt = tok.apply_chat_template(CONV[:1], chat_template=t5.codec.codec.template, tokenize=False, add_generation_prompt=True)
    # the encoder ids without the slots: the prompt in one call, closed by </s> as T5's tokenizer does
    assert [i for i in enc["prefix_ids"] + enc["suffix_ids"] if i >= 0] == tok(prompt)["input_ids"]
    assert enc["target_ids"] == tok("red")["input_ids"] and enc["target_ids"][-1] == tok.eos_token_id


def test_a_mixed_batch_gives_each_sample_its_own_loss(t5):
    """T5's relative position bias: pads between prefix and suffix would change a row's result."""
    batch = batch_of(t5)
    with torch.no_grad():
        together = t5(batch).per_sample_loss
        for i, (conv, has_image) in enumerate(QA):
            emb, patches = features(len(QA))
            alone = t5(t5.collate([t5.encode(conv, has_image)], emb[i : i + 1], patches[i : i + 1])).per_sample_loss
            assert torch.allclose(alone[0], together[i], atol=1e-5), i


def test_prefix_request_reads_the_encoders_states_of_the_whole_prompt(t5_cfg):
    """model.request: prefix on T5: RVII gets every prompt position's encoder state, rows still keep their own loss."""
    from lmeye.model import build_ipn

    ipn = build_ipn(t5_cfg(request="prefix", rvii="transformer", rvii_width=32, rvii_heads=2), FEATURE_DIM, PATCH_SHAPE)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    emb, patches = features(len(QA))
    batch = batch_of(ipn)
    with torch.no_grad():
        together = ipn(batch).per_sample_loss
        for i, (conv, has_image) in enumerate(QA):
            alone = ipn(ipn.collate([ipn.encode(conv, has_image)], emb[i : i + 1], patches[i : i + 1])).per_sample_loss
            assert torch.allclose(alone[0], together[i], atol=1e-5), i
    ipn(batch).loss.backward()
    assert ipn.request_context_proj.weight.grad.abs().sum() > 0


def test_the_request_comes_from_the_encoder_state_at_img_q(t5):
    """Text after <img-q> (here the later turns) cannot change the request; the image (<img>) does."""
    emb, patches = features(2)
    seen = []
    img_d = t5._img_d

    def spy(batch, request_state, context=None):
        seen.append(request_state.clone())
        return img_d(batch, request_state, context)

    t5._img_d = spy
    try:
        first = QA[2][0][:1]  # one user turn
        longer = QA[2][0][:3]  # the same first turn, then more conversation
        with torch.no_grad():
            for conv in (first, longer):
                t5.generate(t5.collate([t5.encode(conv, True, for_generation=True)], emb[:1], patches[:1]), max_new_tokens=2)
            t5.generate(t5.collate([t5.encode(first, True, for_generation=True)], emb[1:], patches[1:]), max_new_tokens=2)
    finally:
        del t5._img_d
    assert torch.equal(seen[0], seen[1]) and not torch.allclose(seen[0], seen[2])
    state = t5.llm.get_encoder()(inputs_embeds=t5.prefix_embeds(t5._to_device(t5.collate([t5.encode(first, True, True)], emb[:1], patches[:1])))).last_hidden_state
    assert torch.allclose(seen[0], state[:, -1], atol=1e-6)


def test_t5_trains_two_steps_saves_loads_chats_and_scores(t5_cfg, tmp_path):
    from lmeye.model import build_ipn, load_ipn

    ipn = build_ipn(t5_cfg(), FEATURE_DIM, PATCH_SHAPE)
    before = {n: p.detach().clone() for n, p in ipn.own_parameters().items()}
    opt = torch.optim.Adam(ipn.trainable_parameters(), lr=1e-2)
    batch = batch_of(ipn)
    ipn.train()
    for _ in range(2):  # transmission starts at zero: the request path gets gradients from step 2
        opt.zero_grad()
        ipn(batch).loss.backward()
        opt.step()
    # every IPN part moved, the request through the T5 encoder included; the LLM did not
    assert {n for n, p in ipn.own_parameters().items() if not torch.equal(p.detach(), before[n])} == set(before)
    assert all(not p.requires_grad and p.grad is None for p in ipn.llm.parameters())
    ipn.save_pretrained(str(tmp_path / "ipn"))
    back = load_ipn(str(tmp_path / "ipn"))
    ipn.eval()
    emb, patches = features(1)
    question = CONV[:1]
    answer = back.chat(question, emb[0], patches[0], max_new_tokens=4)
    assert isinstance(answer, str) and answer == ipn.chat(question, emb[0], patches[0], max_new_tokens=4)
    scores = back.score_choices(question, ["red", "blue square"], emb[0], patches[0])
    with torch.no_grad():
        red = back(back.collate([back.encode(CONV, True)], emb, patches))
    assert scores[0] == pytest.approx(-(red.per_sample_loss * red.num_tokens).item(), rel=1e-5)


def test_t5_through_the_trainers_batch_maker_and_exact_match(t5_cfg, tmp_path):
    """The train stage's data path and its validation (generation, exact match) with the T5 IPN."""
    import importlib.util
    from collections import Counter
    from pathlib import Path

    from lmeye.config import load_config
    from lmeye.store import FeatureStore
    from lmeye.train.data import BatchMaker
    from lmeye.train.evaluate import exact_match
    from lmeye.train.model_factory import IPNFactory
    from lmeye.train.preflight import check_llm, check_tokenizer

    spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path(__file__).parents[1] / "train" / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t = module.build_tables(tmp_path, n_train=6, n_val=3, missing=(), too_long=(), dim=FEATURE_DIM, patch=PATCH_SHAPE)
    cfg = load_config(None, {f"model.{k}": v for k, v in t5_cfg().model_dump().items()})
    check_tokenizer(cfg.model, check_llm(cfg.model))  # the driver's preflight accepts a T5
    store = FeatureStore.open(t["features"])
    ipn = IPNFactory().build(cfg, store.dim, store.patch_shape)
    cols = ("sample_id", "uid", "task", "conversation")
    train = pa.Table.from_pylist([{k: r[k] for k in cols} for r in t["rows"] if r["split"] == "train"])
    prep = BatchMaker(ipn, store).prepare(train)
    out = ipn(prep.batch)
    assert torch.isfinite(out.loss) and out.per_sample_loss.shape == (prep.rows,)
    counts: Counter = Counter()
    val = pa.Table.from_pylist([{k: r[k] for k in cols} for r in t["rows"] if r["split"] == "validation"])
    exact_match(ipn, BatchMaker(ipn, store), val, "cpu", load_config(None).train.model_copy(update={"precision": "fp32"}), counts)
    assert counts["val_rows"] == 3 and 0 <= counts["val_correct"] <= 3
