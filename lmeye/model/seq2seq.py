"""The IPN around an encoder-decoder LLM (T5, FlanT5: upstream LMEye's strongest variant).

Data flow of one batch::

    prompt text + <img> + <img-q> --encoder pass 1--> request = encoder state at <img-q>
    request --RVII, transmission (as for a causal LLM)--> <img-d> x k
    [prompt through <img-q>, <img-d> x k, rest of the prompt, </s>] --encoder pass 2--> states
    states --decoder--> the answer (loss on the answer and its </s>) / generated tokens

The encoder input is the conversation up to the last answer, rendered by the chat template
(T5 ships none: ``model.chat_template: plain`` gives LMEye's "Human: ... Assistant:") and closed
by ``</s>`` as T5 was trained; the decoder target is the last answer plus ``</s>``, tokenised
alone, as T5 targets are. Earlier answers of a multi-turn conversation are encoder text.

What prefix reuse means here: nothing is reused. The encoder attends both ways, so once the
``<img-d>`` vectors join, every prefix state changes, and pass 2 reruns the encoder over the
whole prompt; pass 1 (the prefix alone, to get the request) is the extra cost, one encoder pass
over the prefix, measured by ``benchmarks/ipn.py --family t5`` (README, Benchmarks). ``reuse_prefix`` is accepted and
ignored, so callers stay family-blind.

Packing: T5's attention bias depends on relative positions, so the pads that the shared collate
puts between prefix and suffix would change the result. Pass 2 therefore moves every row's pads
to its left, so each row's real tokens are contiguous, as they are alone (a test checks that a
mixed batch gives every sample the loss it has alone).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lmeye.errors import UserError
from lmeye.model.ipn import IPN, IPNOutput, answer_nll
from lmeye.model.text import IGNORE, IMG_D, TextCodec


class Seq2SeqCodec:
    """Conversations -> encoder ids (prefix and suffix around the slots, as TextCodec lays them out)
    and decoder target ids."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        tok = codec.tokenizer
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer {codec.name!r}: an encoder-decoder LLM needs an EOS token to end its input and answer")
        self.eos = tok.eos_token_id
        # the tokenizer's own habit (T5: "text</s>"); the encoder input ends the same way
        self.closes_with_eos = tok("a")["input_ids"][-1:] == [self.eos]

    @property
    def counts(self):
        return self.codec.counts

    @property
    def max_length(self) -> int:
        return self.codec.max_length

    def stop_ids(self, generation_config=None) -> list[int]:
        return self.codec.stop_ids(generation_config)

    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict[str, Any]]:
        turns = list(conversation)
        answer = None
        if not for_generation:
            if not turns or turns[-1]["role"] != "assistant":
                raise UserError("a training conversation must end with an assistant turn")
            turns, answer = turns[:-1], turns[-1]["content"]
        enc = self.codec.encode(turns, has_image, for_generation=True)
        if enc is None:
            return None
        if self.closes_with_eos:
            enc["suffix_ids"] = enc["suffix_ids"] + [self.eos]
        enc["labels"] = [IGNORE] * len(enc["suffix_ids"])
        if len(enc["prefix_ids"]) + len(enc["suffix_ids"]) > self.max_length:
            self.counts["too_long"] += 1
            return None
        if answer is not None:
            ids, _ = self.codec.ids_and_offsets(answer)
            enc["target_ids"] = list(ids)[: self.max_length - 1] + [self.eos]
        enc["for_generation"] = bool(for_generation)
        return enc


class Seq2SeqIPN(IPN):
    """IPN whose frozen LLM is an encoder-decoder; built by ``lmeye.model.build.build_ipn`` when the LLM is one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codec = Seq2SeqCodec(self.codec)

    def collate(self, encs: list[dict], embeddings=None, patch_tokens=None) -> dict[str, torch.Tensor]:
        out = super().collate(encs, embeddings, patch_tokens)
        if all("target_ids" in e for e in encs):
            width = max(len(e["target_ids"]) for e in encs)
            labels = torch.full((len(encs), width), IGNORE, dtype=torch.long)
            for i, e in enumerate(encs):  # right-padded: the decoder starts every row at position 0
                labels[i, : len(e["target_ids"])] = torch.tensor(e["target_ids"])
            out["decoder_labels"] = labels
        return out

    def encoder_inputs(self, batch: dict, request: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 (the prefix, for the request) and the packed input of pass 2 (embeddings, mask).
        ``request`` given: pass 1 is skipped (benchmarks/ipn.py measures what pass 1 costs)."""
        prefix_emb = self.prefix_embeds(batch)
        context = None
        if request is None and (batch["suffix_ids"] == IMG_D).any():
            states = self.llm.get_encoder()(inputs_embeds=prefix_emb, attention_mask=batch["prefix_mask"]).last_hidden_state
            request = states[:, -1]  # left padding: <img-q> is the last prefix position
            context = states if self.cfg.request == "prefix" else None  # the whole user turn (IPN._img_d)
        emb = torch.cat([prefix_emb, self._suffix_embeds(batch, request, context)], dim=1)
        mask = torch.cat([batch["prefix_mask"], batch["suffix_mask"]], dim=1)
        order = torch.sort(mask, dim=1, stable=True).indices  # pads first, real tokens in their order
        return emb.gather(1, order[..., None].expand_as(emb)), mask.gather(1, order)

    def forward(self, batch: dict, reuse_prefix: bool = True, return_logits: bool = False) -> IPNOutput:
        batch = self._to_device(batch)
        if "decoder_labels" not in batch:
            raise UserError("an encoder-decoder IPN trains on encoded conversations that end with an answer")
        emb, mask = self.encoder_inputs(batch)
        labels = batch["decoder_labels"]
        # labels -> the decoder's inputs (shifted right behind its start token), the model's own rule
        # no decoder cache: training needs none, and a layer called with one is not checkpointed (lmeye.model.recompute)
        logits = self.llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).logits
        nll = answer_nll(logits, labels)  # the causal IPN's chunked fp32 cross-entropy
        counted = (labels != IGNORE).sum(1)
        return IPNOutput(
            loss=nll.sum() / counted.sum().clamp(min=1), per_sample_loss=nll.sum(1) / counted.clamp(min=1),
            logits=logits if return_logits else None, num_tokens=counted,
        )

    @torch.no_grad()
    def generate(
        self, batch: dict, max_new_tokens: int = 32, do_sample: bool = False, num_beams: int = 1,
        streamer=None, reuse_prefix: bool = True, **generation_kwargs: Any,
    ) -> list[str]:
        batch = self._to_device(batch)
        emb, mask = self.encoder_inputs(batch)
        tok = self.tokenizer
        out = self.llm.generate(
            inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            num_beams=num_beams, streamer=streamer, pad_token_id=tok.pad_token_id,
            eos_token_id=self.codec.stop_ids(self.llm.generation_config), **generation_kwargs,
        )
        return tok.batch_decode(out, skip_special_tokens=True)
