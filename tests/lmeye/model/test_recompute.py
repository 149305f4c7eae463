"""Activation checkpointing through the frozen LLM (``IPN.recompute_activations``, ``lmeye.model.recompute``):
the same loss and gradients, nothing kept for the backward pass from inside an LLM layer but the layer's
inputs, the layers run again in the backward pass, the LLM stays in eval mode, and generation keeps its
prefix cache. (How much memory that saves is ``benchmarks/train_memory.py``'s to measure.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear maps

from lmeye.model.testing import FAMILIES, FEATURE_DIM, PATCH_SHAPE, QA, batch_of, features


def _ipn(ipn_factory, family: str, recompute: bool):
    ipn = ipn_factory(family)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero transmission: the gradients reach every part through the LLM
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    if recompute:
        ipn.recompute_activations()
    return ipn.train()


def _layers(ipn) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in ipn.llm.modules() if isinstance(m, GradientCheckpointingLayer)]


def _step(ipn, batch) -> tuple[dict, dict]:
    """One forward and backward; (loss and gradients, what happened inside the LLM's layers)."""
    inside = [0]
    inputs: set[int] = set()  # storages of the layers' tensor inputs
    seen = {"saved_inside": 0, "saved_not_inputs": 0, "calls_forward": 0, "calls_backward": 0}
    phase = ["forward"]

    def enter(module, args, kwargs):
        inside[0] += 1
        flat = list(args) + [v for x in kwargs.values() for v in (x if isinstance(x, tuple) else (x,))]
        inputs.update(t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor))

    def leave(module, args, out):
        inside[0] -= 1

    def pack(t):
        if inside[0] > 0:  # a tensor kept for the backward pass from inside a layer
            seen["saved_inside"] += 1
            seen["saved_not_inputs"] += t.untyped_storage().data_ptr() not in inputs
        return t

    def count(module, args):  # a layer's first linear map: it runs in the backward pass's replay too, which
        seen[f"calls_{phase[0]}"] += 1  # calls the layer's forward directly, past the layer's own hooks

    handles = [h for m in _layers(ipn)
               for h in (m.register_forward_pre_hook(enter, with_kwargs=True), m.register_forward_hook(leave),
                         next(c for c in m.modules() if isinstance(c, (nn.Linear, Conv1D))).register_forward_pre_hook(count))]
    try:
        ipn.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ipn(batch)
        phase[0] = "backward"
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.clone() for n, p in ipn.own_parameters().items() if p.grad is not None}
    return {"loss": out.loss.detach(), "grads": grads}, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_activations_train_the_same_and_keep_nothing_from_inside_the_llms_layers(ipn_factory, family):
    kept, kept_seen = _step(_ipn(ipn_factory, family, False), batch_of(_ipn(ipn_factory, family, False)))
    ipn = _ipn(ipn_factory, family, True)
    again, seen = _step(ipn, batch_of(ipn))
    assert torch.allclose(kept["loss"], again["loss"], atol=1e-5)
    assert kept["grads"].keys() == again["grads"].keys() and again["grads"]
    for n in kept["grads"]:
        assert torch.allclose(kept["grads"][n], again["grads"][n], atol=1e-5), n
    layers = len(_layers(ipn))
    # the default path keeps the layers' activations; recomputing, a layer keeps only its inputs
    assert kept_seen["saved_not_inputs"] > 0 and seen["saved_not_inputs"] == 0
    assert 0 < seen["saved_inside"] < kept_seen["saved_inside"]
    # pass 1 and pass 2 run every layer once; the backward pass runs each of them again (not the default path)
    assert seen["calls_forward"] == kept_seen["calls_forward"] == 2 * layers
    assert seen["calls_backward"] == 2 * layers and kept_seen["calls_backward"] == 0
    assert not any(m.training for m in ipn.llm.modules())  # eval mode: no dropout in the frozen LLM


def test_generation_and_evaluation_keep_the_prefix_cache(ipn_factory):
    ipn = _ipn(ipn_factory, "llama", True)
    prompts = ipn.collate([ipn.encode(c[:1], img, for_generation=True) for c, img in QA], *features(len(QA)))
    plain = _ipn(ipn_factory, "llama", False)
    assert ipn.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
    calls = []
    handles = [m.register_forward_pre_hook(lambda m, a, k: calls.append(k.get("cache") is not None), with_kwargs=True)
               for m in _layers(ipn)]
    with torch.no_grad():  # validation loss: no backward, so the cached path
        ipn(batch_of(ipn))
    for h in handles:
        h.remove()
    assert calls and all(calls)


def test_the_t5_ipn_recomputes_its_encoder_and_decoder_layers(released, clip_checkpoint):
    from lmeye.model import build_ipn
    from lmeye.model.testing import tiny_model_config

    def t5(recompute: bool):
        ipn = build_ipn(tiny_model_config(released["t5"], clip_checkpoint, chat_template="plain", num_img_d=3),
                        FEATURE_DIM, PATCH_SHAPE)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in ipn.own_parameters().values():
                p.normal_(0, 0.3)
        if recompute:
            ipn.recompute_activations()
        return ipn.train()

    kept, kept_seen = _step(t5(False), batch_of(t5(False)))
    ipn = t5(True)
    again, seen = _step(ipn, batch_of(ipn))
    assert torch.allclose(kept["loss"], again["loss"], atol=1e-5)
    for n in kept["grads"]:
        assert torch.allclose(kept["grads"][n], again["grads"][n], atol=1e-5), n
    assert kept_seen["saved_not_inputs"] > 0 and seen["saved_not_inputs"] == 0
    assert seen["calls_backward"] == kept_seen["calls_forward"] > 0
