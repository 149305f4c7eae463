"""The IPN: LMEye's Interactive Perception Network around a frozen causal LLM.

Data flow of one batch (``forward`` and ``generate`` share it up to the second pass)::

    image embedding --visual mapping--> <img> x num_img  --.
    prefix text + <img> + <img-q> --LLM pass 1 (cache)--> request = last hidden state at <img-q>
    request --linear--> k request vectors --RVII with image tokens--> k vectors
        (model.request: prefix: RVII also reads every prefix position's hidden state, projected)
            --transmission--> <img-d> x k
    [<img-d> x k, rest of the conversation] --LLM pass 2 on the prefix cache--> logits -> loss / tokens

Pass 1 covers the prefix only and its keys/values are reused by pass 2, so an answer costs one
prefix pass plus k + answer tokens; upstream LMEye reruns the whole sequence (``reuse_prefix=False``
here, kept as the reference that tests and ``benchmarks/ipn.py`` compare against).

Batch layout: prefixes are left-padded (so ``<img-q>`` is the last prefix position in every row)
and suffixes are left-padded too (pads between prefix and suffix, so generation appends at the
right edge for every row). Position ids are ``cumsum(mask) - 1``, which makes every row's
positions exactly those it has alone; this is what makes a mixed batch give each sample's own
loss. Text-only rows take the same path with no slots.

Only the IPN's own parameters train; the LLM and the CLIP text tower are frozen (requires_grad
False, eval mode), and the LLM's vocabulary and embedding matrix are never resized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.utils import ModelOutput

from lmeye.errors import UserError
from lmeye.model.io import save_ipn
from lmeye.model.recompute import recompute_layers
from lmeye.model.rvii import ClipTextRVII, TransformerRVII
from lmeye.model.text import IGNORE, IMG, IMG_D, IMG_Q, TextCodec

if TYPE_CHECKING:  # annotations only: the model runs with torch and transformers alone (benchmarks/train_gpu.py)
    from lmeye.config.model import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FROZEN_PREFIXES = ("llm.", "rvii.tower.")  # referenced by the config, never saved
PARTS = {  # part name -> the IPN's own parameter-name prefixes (describe, set_trainable)
    "visual_mapping": ("img_proj.", "img_embed"),
    "request": ("imgq_embed", "request_proj.", "request_context_"),
    "rvii": ("rvii.",),
    "transmission": ("transmit.", "imgd_embed"),
}


@dataclass
class IPNOutput(ModelOutput):
    """A transformers ``ModelOutput`` (a dict as well): DeepSpeed ZeRO-3 looks for the output tensors
    of a module in tuples, lists and dicts only, and without them the IPN's backward hook never runs,
    so its own top-level weights (<img-q>, <img>, <img-d> embeddings) stay released (shape [0])
    when their gradients arrive. Every field defaults to None, as ModelOutput requires."""

    loss: Optional[torch.Tensor] = None  # mean over every answer token of the batch
    per_sample_loss: Optional[torch.Tensor] = None  # (B,) mean over each sample's answer tokens
    logits: Optional[torch.Tensor] = None  # (B, S, V) over the suffix
    num_tokens: Optional[torch.Tensor] = None  # (B,) answer tokens per sample


def llm_config(cfg: ModelConfig):
    """The LLM's ``transformers`` config, once its architecture is known to be one the IPN runs.

    The one place that says which architectures are supported (the driver's preflight and every
    worker's ``load_llm`` ask it), so a new kind of LLM is added here. One UserError naming the path."""
    import os

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, AutoConfig

    if not cfg.llm:
        raise UserError("model.llm is not set: name a causal (or encoder-decoder) LM directory (the demo builds one with lmeye.model.demo.ensure_demo_llm)")
    try:
        llm_cfg = AutoConfig.from_pretrained(cfg.llm)
    except (OSError, ValueError) as err:
        where = "no such directory" if not os.path.exists(cfg.llm) else "no usable config.json"
        raise UserError(f"model.llm {cfg.llm!r}: {where} ({str(err).splitlines()[0]})") from None
    # an encoder-decoder (T5, FlanT5) is wrapped by lmeye.model.seq2seq.Seq2SeqIPN
    seq2seq = getattr(llm_cfg, "is_encoder_decoder", False) and type(llm_cfg) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    if not seq2seq and type(llm_cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"model.llm {cfg.llm!r} is not a causal LM nor an encoder-decoder LM ({type(llm_cfg).__name__})")
    return llm_cfg


def load_tokenizer(cfg: ModelConfig):
    """The configured tokenizer (``model.tokenizer``, else the LLM's); one UserError naming it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.llm)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"model.tokenizer {cfg.tokenizer or cfg.llm!r}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pads are masked; any id works
    return tok


def load_llm(cfg: ModelConfig):
    """(frozen causal or encoder-decoder LM, tokenizer) from ``cfg.llm``; one UserError naming the path if it is not one."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per loaded model is enough
    llm_cfg = llm_config(cfg)
    seq2seq = bool(getattr(llm_cfg, "is_encoder_decoder", False))
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        llm = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(cfg.llm, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UserError(f"model.llm {cfg.llm!r} is not a causal LM ({type(llm_cfg).__name__})") from None
        raise
    except OSError as err:
        raise UserError(f"model.llm {cfg.llm!r}: cannot load weights ({str(err).splitlines()[0]})") from None
    return llm, load_tokenizer(cfg)


def llm_context(llm) -> int:
    return config_context(llm.config)


def config_context(config) -> int:
    """Positions an LLM of this ``transformers`` config takes (very many when it names no limit)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(c, key, None):
            return int(getattr(c, key))
    return 1 << 30


class IPN(nn.Module):
    def __init__(self, cfg: ModelConfig, feature_dim: int, patch_shape: Optional[tuple[int, int]], llm, tokenizer, clip_tower=None):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = int(feature_dim)
        self.patch_shape = tuple(int(x) for x in patch_shape) if patch_shape else None
        self.llm = llm.eval()
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.recomputes = False  # activation checkpointing through the LLM (recompute_activations)
        hidden = int(llm.get_input_embeddings().weight.shape[1])
        self.hidden = hidden
        k = cfg.num_img_d
        torch.manual_seed(cfg.seed)  # the same config gives the same initial IPN
        # 1. visual mapping: pooled embedding -> <img> x num_img (LMEye stage 1: imageLinear + embedding)
        self.img_proj = nn.Linear(self.feature_dim, cfg.num_img * hidden)
        self.img_embed = nn.Parameter(torch.zeros(cfg.num_img, hidden))
        # 2. request acquisition: the learned <img-q> embedding; its hidden state -> k request vectors
        self.imgq_embed = nn.Parameter(torch.randn(hidden) * 0.02)
        # 3. RVII over the image tokens (patch tokens, or the pooled embedding as one token)
        image_dim = self.patch_shape[1] if self.patch_shape else self.feature_dim
        if cfg.rvii == "clip_text":
            if clip_tower is None:
                raise UserError("model.rvii clip_text needs the CLIP text tower (model.clip_model / clip_pretrained)")
            self.rvii = ClipTextRVII(clip_tower, image_dim, k, cfg.rvii_image_tokens, cfg.rvii_center_tokens)
        else:
            self.rvii = TransformerRVII(image_dim, k, cfg.rvii_width, cfg.rvii_layers, cfg.rvii_heads, cfg.rvii_image_tokens, cfg.rvii_center_tokens)
        self.request_proj = nn.Linear(hidden, k * self.rvii.request_width)
        max_length = min(cfg.max_length, llm_context(llm))
        if cfg.request == "prefix":
            # instruction-aware RVII: one 64-d state at <img-q> did not carry "red", "circle" and four options
            # well enough to check them against the image, so RVII reads the whole user turn as the LLM saw it.
            # Each position also gets a learned embedding of its distance from <img-q>: left padding moves
            # absolute positions, and a yes/no or multiple-choice prompt's fixed closing sentence keeps its
            # candidate and options at nearly fixed distances from the end.
            self.request_context_proj = nn.Linear(hidden, self.rvii.request_width)
            self.request_context_pos = nn.Parameter(torch.randn(max_length, self.rvii.request_width) * 0.02)
        # 4. transmission: RVII output -> added to the learned <img-d> embeddings. Zero-initialised,
        # so an untrained IPN feeds the LLM constant <img-d> embeddings rather than noise.
        # shared (LMEye's): one map applied to each of the k outputs; joint: each <img-d> from all k
        # outputs together, so the slots can spell an answer across them in order.
        joint = cfg.transmission == "joint"
        self.transmit = nn.Linear(self.rvii.out_dim * (k if joint else 1), hidden * (k if joint else 1))
        nn.init.zeros_(self.transmit.weight)
        nn.init.zeros_(self.transmit.bias)
        self.imgd_embed = nn.Parameter(torch.randn(k, hidden) * 0.02)
        self.codec = TextCodec(tokenizer, num_img=cfg.num_img, num_img_d=k, max_length=max_length, system_prompt=cfg.system_prompt,
                               chat_template=cfg.chat_template)
        self.set_trainable("instruct")

    # ---------------------------------------------------------------------------------------
    # construction, parameters, saving
    def save_pretrained(self, directory: str) -> str:
        """The model directory (``lmeye.model.io``); ``lmeye.model.build.load_ipn`` reads it back."""
        return save_ipn(self, directory)

    def own_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith(FROZEN_PREFIXES)}

    def set_trainable(self, stage: Literal["align", "instruct"], train_visual_mapping: bool = True) -> None:
        """align: the visual mapping only (LMEye stage 1); instruct: request, RVII, transmission (+ mapping)."""
        if stage not in ("align", "instruct"):
            raise UserError(f"unknown training stage {stage!r}; one of align, instruct")
        parts = {"visual_mapping"} if stage == "align" else {"request", "rvii", "transmission"} | ({"visual_mapping"} if train_visual_mapping else set())
        for name, p in self.own_parameters().items():
            p.requires_grad_(any(name.startswith(PARTS[part]) for part in parts))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.own_parameters().values() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every IPN-own weight (whatever the stage), i.e. what a checkpoint holds."""
        return {n: p.detach() for n, p in self.own_parameters().items()}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.own_parameters()
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise UserError(f"IPN weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, p in own.items():
            if tuple(sd[n].shape) != tuple(p.shape):
                raise UserError(f"IPN weight {n}: shape {tuple(sd[n].shape)} in the checkpoint, {tuple(p.shape)} in the model")
            with torch.no_grad():
                p.copy_(sd[n].to(p.dtype))

    def recompute_activations(self) -> None:
        """Activation checkpointing through the frozen LLM (``train.activation_checkpointing``;
        ``lmeye.model.recompute``): its layers' activations are recomputed in the backward pass. The
        training forward then runs pass 2 over the whole sequence, without the prefix cache (a cached
        layer cannot be replayed), so the prefix is computed twice; evaluation and generation keep the cache."""
        recompute_layers(self.llm)
        self.recomputes = True

    def train(self, mode: bool = True) -> "IPN":
        super().train(mode)
        self.llm.eval()  # frozen parts stay in eval mode (no dropout)
        if isinstance(self.rvii, ClipTextRVII):
            self.rvii.tower.eval()
        return self

    # ---------------------------------------------------------------------------------------
    # data
    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict]:
        """Token ids of one sample (lmeye.model.text); None when it cannot fit ``max_length``."""
        return self.codec.encode(conversation, has_image, for_generation)

    @property
    def encode_counts(self) -> dict[str, int]:
        """How many samples ``encode`` took whole (encoded), cut (truncated) or skipped (too_long)."""
        return dict(self.codec.counts)

    def check_features(self, embed_dim: int, patch_shape: Optional[Sequence[int]]) -> None:
        """Raise (naming both numbers) when a features table does not fit this IPN; call before any step."""
        if int(embed_dim) != self.feature_dim:
            raise UserError(f"features have embedding dimension {embed_dim}, the IPN expects {self.feature_dim}")
        if self.patch_shape and patch_shape and int(patch_shape[1]) != self.patch_shape[1]:
            raise UserError(f"features have patch-token width {patch_shape[1]}, the IPN expects {self.patch_shape[1]}")
        if self.patch_shape and not patch_shape:
            raise UserError(f"the IPN expects patch tokens {self.patch_shape}, the features have none")
        if self.patch_shape and int(patch_shape[0]) != self.patch_shape[0]:  # another grid (extract.patch_pool)
            raise UserError(f"features have {patch_shape[0]} patch tokens an image, the IPN was trained on {self.patch_shape[0]}: "
                            "extract them with the patch grid (extract.patch_pool) of the IPN's training table")

    def collate(self, encs: list[dict], embeddings: Optional[np.ndarray] = None, patch_tokens: Optional[np.ndarray] = None) -> dict[str, torch.Tensor]:
        """Pad encoded samples into one batch (CPU tensors). Rows of text-only samples in
        ``embeddings`` / ``patch_tokens`` are ignored (pass zeros)."""
        b = len(encs)
        pad = self.tokenizer.pad_token_id
        p_len = max(len(e["prefix_ids"]) for e in encs)
        s_len = max(len(e["suffix_ids"]) for e in encs)
        out = {
            "prefix_ids": torch.full((b, p_len), pad, dtype=torch.long),
            "prefix_mask": torch.zeros(b, p_len, dtype=torch.long),
            "suffix_ids": torch.full((b, s_len), pad, dtype=torch.long),
            "suffix_mask": torch.zeros(b, s_len, dtype=torch.long),
            "labels": torch.full((b, s_len), IGNORE, dtype=torch.long),
            "has_image": torch.tensor([e["has_image"] for e in encs], dtype=torch.bool),
        }
        for i, e in enumerate(encs):  # left padding for both parts (see the module docstring)
            n, m = len(e["prefix_ids"]), len(e["suffix_ids"])
            out["prefix_ids"][i, p_len - n :] = torch.tensor(e["prefix_ids"])
            out["prefix_mask"][i, p_len - n :] = 1
            out["suffix_ids"][i, s_len - m :] = torch.tensor(e["suffix_ids"])
            out["suffix_mask"][i, s_len - m :] = 1
            out["labels"][i, s_len - m :] = torch.tensor(e["labels"])
        if out["has_image"].any():
            if embeddings is None:
                raise UserError("a batch with images needs their embeddings")
            emb = np.asarray(embeddings, dtype=np.float32).reshape(b, -1)
            self.check_features(emb.shape[1], None if patch_tokens is None else np.asarray(patch_tokens).shape[1:])
            out["embeddings"] = torch.from_numpy(emb)
            if self.patch_shape:
                out["patch_tokens"] = torch.from_numpy(np.asarray(patch_tokens, dtype=np.float32).reshape(b, -1, self.patch_shape[1]))
        return out

    # ---------------------------------------------------------------------------------------
    # the two passes
    @property
    def device(self) -> torch.device:
        return self.imgq_embed.device

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids.clamp(min=0))

    def prefix_embeds(self, batch: dict) -> torch.Tensor:
        """Pass 1's input embeddings: the prefix's tokens with the <img> and <img-q> slots filled
        (``benchmarks/ipn.py`` runs the encoder on them alone)."""
        ids = batch["prefix_ids"]
        emb = self._embed(ids)
        dtype = emb.dtype
        q = ids == IMG_Q
        emb = torch.where(q[..., None], self.imgq_embed.to(dtype), emb)
        img = ids == IMG
        # whenever the batch carries features, not only when a row has an <img>: under ZeRO-3 every
        # rank must run the same modules (their weights are gathered collectively), so the trainer
        # gives a text-only batch zero features and it runs the same parts as the others
        if "embeddings" in batch:
            mapped = self.img_proj(batch["embeddings"].to(self.img_proj.weight.dtype)).view(len(ids), self.cfg.num_img, -1) + self.img_embed
            slot = (img.cumsum(1) - 1).clamp(min=0)  # j-th <img> of a row gets its j-th mapped vector
            emb = torch.where(img[..., None], mapped.to(dtype).gather(1, slot[..., None].expand(-1, -1, emb.shape[-1])), emb)
        return emb

    def _img_d(self, batch: dict, request_state: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, k, H) <img-d> embeddings: learned embeddings + transmission(RVII(request, image tokens)).
        ``context`` (B, P, H): pass 1's hidden states at every prefix position (``model.request: prefix``)."""
        k = self.cfg.num_img_d
        w = self.request_proj.weight
        request = self.request_proj(request_state.to(w.dtype)).view(len(request_state), k, -1)
        if "patch_tokens" in batch:
            tokens = batch["patch_tokens"].to(w.dtype)
        else:  # no patch tokens in the features table: RVII sees the pooled embedding as one token
            tokens = batch["embeddings"].to(w.dtype)[:, None]
        if context is None:
            out = self.rvii(request, tokens).to(w.dtype)
        else:
            out = self.rvii(request, tokens, self._request_context(context), batch["prefix_mask"]).to(w.dtype)
        if self.cfg.transmission == "joint":
            return self.imgd_embed + self.transmit(out.flatten(1)).view(len(out), k, -1)
        return self.imgd_embed + self.transmit(out)

    def _request_context(self, states: torch.Tensor) -> torch.Tensor:
        """(B, P, H) prefix hidden states -> (B, P, RVII width): projected, plus the embedding of each
        position's distance from <img-q> (the last prefix position in every row: left padding)."""
        w = self.request_context_proj.weight
        distance = torch.arange(states.shape[1] - 1, -1, -1, device=states.device).clamp(max=len(self.request_context_pos) - 1)
        return self.request_context_proj(states.to(w.dtype)) + self.request_context_pos[distance]

    def _suffix_embeds(self, batch: dict, request_state: Optional[torch.Tensor], context: Optional[torch.Tensor] = None) -> torch.Tensor:
        ids = batch["suffix_ids"]
        emb = self._embed(ids)
        d = ids == IMG_D
        if "embeddings" in batch:  # as in prefix_embeds
            img_d = self._img_d(batch, request_state, context).to(emb.dtype)
            slot = (d.cumsum(1) - 1).clamp(min=0)
            emb = torch.where(d[..., None], img_d.gather(1, slot[..., None].expand(-1, -1, emb.shape[-1])), emb)
        return emb

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _prefix_pass(self, batch: dict, with_cache: bool = True):
        """Pass 1 over the prefixes: (prefix embeddings, cache or None, request state at <img-q>, and the
        hidden states of every prefix position for ``model.request: prefix``, else None)."""
        from transformers import DynamicCache

        emb = self.prefix_embeds(batch)
        mask = batch["prefix_mask"]
        cache = DynamicCache(config=self.llm.config) if with_cache else None
        out = self.llm(
            inputs_embeds=emb, attention_mask=mask, position_ids=positions(mask),
            cache=cache, use_cache=with_cache, output_hidden_states=True, logits_to_keep=1,
        )
        states = out.hidden_states[-1]
        context = states if self.cfg.request == "prefix" else None
        return emb, out.cache if with_cache else None, states[:, -1], context  # left padding: <img-q> is the last position

    def forward(self, batch: dict, reuse_prefix: bool = True, return_logits: bool = False) -> IPNOutput:
        """Loss on the answer tokens. ``reuse_prefix=False`` recomputes the whole sequence in pass 2
        (upstream's way; the reference for tests and the benchmark), and so does a forward with gradients
        once ``recompute_activations`` is on."""
        batch = self._to_device(batch)
        reuse_prefix = reuse_prefix and not (self.recomputes and torch.is_grad_enabled())
        prefix_emb, cache, request, context = self._prefix_pass(batch, with_cache=reuse_prefix)
        suffix_emb = self._suffix_embeds(batch, request, context)
        mask = torch.cat([batch["prefix_mask"], batch["suffix_mask"]], dim=1)
        pos = positions(mask)
        p_len = prefix_emb.shape[1]
        labels = batch["labels"]
        # logits at suffix position t predict token t+1; the first suffix token is never an answer token.
        # The LLM computes logits only at positions where some row has an answer token (a 128k vocabulary
        # over the whole suffix was ~10 GB at micro-batch 16 x 512), unless the caller wants them all.
        target = labels[:, 1:]
        answer_at = (target != IGNORE).any(0).nonzero().squeeze(1)
        keep = 0 if return_logits else answer_at  # 0: every position (transformers' logits_to_keep)
        if reuse_prefix:
            logits = self.llm(inputs_embeds=suffix_emb, attention_mask=mask, position_ids=pos[:, p_len:], cache=cache,
                              use_cache=True, logits_to_keep=keep).logits
        else:
            full = torch.cat([prefix_emb, suffix_emb], dim=1)
            logits = self.llm(inputs_embeds=full, attention_mask=mask, position_ids=pos, use_cache=False,
                              logits_to_keep=keep if return_logits else keep + p_len).logits
            logits = logits[:, p_len:] if return_logits else logits
        answer_logits = logits[:, answer_at] if return_logits else logits
        nll = answer_nll(answer_logits, target[:, answer_at])
        counted = (target != IGNORE).sum(1)
        per_sample = nll.sum(1) / counted.clamp(min=1)
        loss = nll.sum() / counted.sum().clamp(min=1)
        return IPNOutput(loss=loss, per_sample_loss=per_sample, logits=logits if return_logits else None, num_tokens=counted)

    # ---------------------------------------------------------------------------------------
    # inference
    @torch.no_grad()
    def generate(
        self, batch: dict, max_new_tokens: int = 32, do_sample: bool = False, num_beams: int = 1,
        streamer=None, reuse_prefix: bool = True, **generation_kwargs: Any,
    ) -> list[str]:
        """Answers for a batch of prompts (``encode(..., for_generation=True)`` + ``collate``), decoded.

        ``generate`` is given the FULL embeddings plus a copy of the prefix cache (REFERENCES §8): it
        computes only the <img-d> and prompt-tail positions before decoding."""
        batch = self._to_device(batch)
        prefix_emb, cache, request, context = self._prefix_pass(batch)
        full = torch.cat([prefix_emb, self._suffix_embeds(batch, request, context)], dim=1)
        mask = torch.cat([batch["prefix_mask"], batch["suffix_mask"]], dim=1)
        kwargs: dict[str, Any] = {}
        if reuse_prefix:
            if num_beams > 1:
                cache.batch_repeat_interleave(num_beams)  # generate expands the inputs, not a given cache
            kwargs["cache"] = cache
        tok = self.tokenizer
        out = self.llm.generate(
            inputs_embeds=full, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            num_beams=num_beams, streamer=streamer, pad_token_id=tok.pad_token_id,
            eos_token_id=self.codec.stop_ids(self.llm.generation_config),  # end-of-turn tokens + the LLM's own stop list
            **kwargs, **generation_kwargs,
        )
        return tok.batch_decode(out, skip_special_tokens=True)

    def chat(self, conversation: list[dict], embedding=None, patch_tokens=None, **gen: Any) -> str:
        """One answer to ``conversation`` (ending with the user's turn), about one image or none."""
        enc = self.encode(conversation, embedding is not None, for_generation=True)
        if enc is None:
            raise UserError(f"the conversation does not fit the model's {self.codec.max_length} tokens")
        emb = None if embedding is None else np.asarray(embedding)[None]
        pt = None if patch_tokens is None else np.asarray(patch_tokens)[None]
        return self.generate(self.collate([enc], emb, pt), **gen)[0]

    @torch.no_grad()
    def score_choices(self, conversation: list[dict], choices: list[str], embedding=None, patch_tokens=None, reduction: Literal["sum", "mean"] = "sum") -> list[float]:
        """Log-likelihood of each choice as the assistant's answer to ``conversation`` (ending with the
        user's turn); the answer's tokens include the template's end-of-turn marker. Higher is better."""
        has_image = embedding is not None
        encs = [self.encode(list(conversation) + [{"role": "assistant", "content": c}], has_image) for c in choices]
        if any(e is None for e in encs):
            raise UserError(f"a choice does not fit the model's {self.codec.max_length} tokens")
        n = len(choices)
        emb = None if embedding is None else np.repeat(np.asarray(embedding)[None], n, 0)
        pt = None if patch_tokens is None else np.repeat(np.asarray(patch_tokens)[None], n, 0)
        out = self.forward(self.collate(encs, emb, pt))
        nll = out.per_sample_loss * (out.num_tokens if reduction == "sum" else 1)
        return (-nll).tolist()


CE_ROWS = 4096  # logit rows (batch x positions) upcast to fp32 at once by answer_nll


def answer_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, K, V) logits, (B, K) targets -> (B, K) fp32 negative log-likelihoods (0 at IGNORE).

    In chunks of positions, each recomputed in the backward pass: only one chunk's fp32 copy of the
    logits (and its log-softmax) exists at a time, not one over every answer position."""
    b, k = target.shape
    if k == 0:
        return logits.new_zeros(b, 0, dtype=torch.float32)
    step = max(1, CE_ROWS // max(1, b))
    parts = []
    for s in range(0, k, step):
        chunk, tgt = logits[:, s : s + step], target[:, s : s + step]
        if torch.is_grad_enabled() and chunk.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_nll, chunk, tgt, use_reentrant=False))
        else:
            parts.append(_nll(chunk, tgt))
    return torch.cat(parts, dim=1)


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: every row gets the positions it would have alone."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
