"""Activation checkpointing through the frozen LLM: each transformer layer's activations are
recomputed in the backward pass instead of being kept from the forward.

The IPN's gradients flow back through the LLM (to the <img>, <img-q> and <img-d> slots), so without
it every layer keeps its attention and MLP activations for the backward pass. transformers' own
switch (``gradient_checkpointing_enable``) does not serve here: it checkpoints only modules in
training mode, and the frozen LLM stays in eval mode (no dropout); and it drops the KV cache of a
checkpointed layer (``cache=None``), because a layer that writes the cache would write it a second
time when the backward pass replays it. So the layers are wrapped here, whatever their mode, and a
call that carries a cache runs as it is (not checkpointed): the IPN's training forward then runs
without the prefix cache (``IPN.forward``; pass 2 reruns the prefix, as upstream LMEye does), and
generation, which needs no backward, keeps its cache.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # the names transformers' layers use


def recompute_layers(model: nn.Module) -> int:
    """Checkpoint every outermost transformer layer of ``model`` (transformers'
    ``GradientCheckpointingLayer``: decoder, encoder and T5 blocks); returns how many. Idempotent."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}
    outermost = [m for name, m in layers.items()
                 if not any(name.startswith(other + ".") for other in layers if other != name)]
    for layer in outermost:
        forward = layer.__dict__.get("forward")
        if not (isinstance(forward, functools.partial) and forward.func is _recomputed):
            # an instance attribute: module hooks (DeepSpeed ZeRO-3's weight gathering) stay in __call__,
            # outside the checkpoint, and run again for the replay through the layer's submodules
            layer.forward = functools.partial(_recomputed, layer.forward)
    return len(outermost)


def _recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled() and all(kwargs.get(k) is None for k in CACHE_ARGS):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
