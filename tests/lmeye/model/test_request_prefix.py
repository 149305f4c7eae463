"""``model.request: prefix``: RVII reads the whole user turn as the LLM read it, not only the <img-q> state."""

from __future__ import annotations

import pydantic
import pytest
import torch

from lmeye.model import load_ipn
from lmeye.model.testing import QA, batch_of, features

TRANSFORMER = {"rvii": "transformer", "rvii_width": 32, "rvii_heads": 2}


def _wake(ipn):
    """Non-zero transmission, so the <img-d> slots depend on what RVII reads."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    return ipn


def _img_d(ipn, question: str, request=None):
    """The <img-d> embeddings for one question about image 0, and the request state at <img-q>;
    ``request`` given: RVII gets that request vector instead of the question's own."""
    emb, patches = features(1)
    batch = ipn._to_device(ipn.collate([ipn.encode([{"role": "user", "content": question}], True, for_generation=True)], emb, patches))
    with torch.no_grad():
        _, _, own, context = ipn._prefix_pass(batch, with_cache=False)
        return ipn._img_d(batch, own if request is None else request, context), own


@pytest.mark.parametrize("request_kind", ["last", "prefix"])
def test_rvii_reads_the_earlier_words_of_the_question_only_with_prefix(ipn_factory, request_kind):
    """Two questions that differ in an early word, the request vector at <img-q> held the same: with
    ``prefix`` the <img-d> slots differ (RVII read the word), with ``last`` they cannot."""
    ipn = _wake(ipn_factory("llama", request=request_kind, **TRANSFORMER))
    red, request = _img_d(ipn, "Is the circle red? Please answer yes or no.")
    blue, _ = _img_d(ipn, "Is the circle blue? Please answer yes or no.", request)
    assert red.shape == (1, ipn.cfg.num_img_d, ipn.hidden)
    assert (not torch.allclose(red, blue, atol=1e-4)) == (request_kind == "prefix")


def test_prefix_request_projects_every_prefix_position(ipn_factory):
    ipn = _wake(ipn_factory("llama", request="prefix", **TRANSFORMER))
    states = torch.randn(3, 7, ipn.hidden)
    context = ipn._request_context(states)
    assert context.shape == (3, 7, ipn.rvii.request_width)
    moved = states.clone()
    moved[:, 0] += 1.0  # the first position only
    changed = (ipn._request_context(moved) - context).abs().sum(-1) > 0
    assert changed[:, 0].all() and not changed[:, 1:].any()


def test_prefix_request_rows_keep_their_own_loss_cache_and_answers(ipn_factory):
    """Left padding is masked in RVII: a row in a batch of longer prompts gives what it gives alone; the
    prefix cache and generate work as with ``last``."""
    ipn = _wake(ipn_factory("llama", request="prefix", **TRANSFORMER)).eval()  # eval: torch's fast attention path, as in generation
    emb, patches = features(len(QA))
    encs = [ipn.encode(c, img) for c, img in QA]
    batch = ipn.collate(encs, emb, patches)
    with torch.no_grad():
        together = ipn(batch).per_sample_loss
        alone = [ipn(ipn.collate([e], emb[i : i + 1], patches[i : i + 1])).per_sample_loss[0] for i, e in enumerate(encs)]
        cached, full = ipn(batch, return_logits=True), ipn(batch, reuse_prefix=False, return_logits=True)
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert (cached.logits - full.logits)[batch["suffix_mask"].bool()].abs().max() <= 1e-4
    prompts = ipn.collate([ipn.encode(c[:1], img, for_generation=True) for c, img in QA], emb, patches)
    greedy = ipn.generate(prompts, max_new_tokens=4)
    assert greedy == ipn.generate(prompts, max_new_tokens=4, reuse_prefix=False)
    assert ipn.generate(prompts, max_new_tokens=4, num_beams=2) == ipn.generate(prompts, max_new_tokens=4, num_beams=2, reuse_prefix=False)


def test_prefix_request_trains_in_stage_2_and_saves(ipn_factory, tmp_path):
    ipn = ipn_factory("llama", request="prefix", **TRANSFORMER)
    ipn.set_trainable("align")
    assert not ipn.request_context_proj.weight.requires_grad and not ipn.request_context_pos.requires_grad
    ipn.set_trainable("instruct")
    _wake(ipn)
    ipn(batch_of(ipn)).loss.backward()
    assert ipn.request_context_proj.weight.grad.abs().sum() > 0 and ipn.request_context_pos.grad.abs().sum() > 0
    ipn.save_pretrained(str(tmp_path / "m"))
    again = load_ipn(str(tmp_path / "m"))
    assert again.cfg.request == "prefix"
    batch = batch_of(ipn)
    with torch.no_grad():
        assert torch.equal(ipn(batch, return_logits=True).logits, again(batch, return_logits=True).logits)


def test_last_request_keeps_lmeyes_weights(ipn_factory):
    """The default adds nothing: checkpoints trained before the option load as they are."""
    names = set(ipn_factory("llama", **TRANSFORMER).own_parameters())
    assert not any(n.startswith("request_context") for n in names)


def test_prefix_request_with_the_clip_text_tower_is_refused(model_cfg):
    with pytest.raises(pydantic.ValidationError, match="request: prefix needs rvii: transformer"):
        model_cfg("llama", request="prefix")
