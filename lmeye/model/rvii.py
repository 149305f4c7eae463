"""RVII, request-based visual information interaction: the LLM's request meets the image features.

Both variants take the request vectors (k of them, from the hidden state at ``<img-q>``) and the
image tokens (projected patch tokens, or the projected pooled embedding when the features table
has no patch tokens) and return k vectors, which transmission maps to the k ``<img-d>`` embeddings.

* ``ClipTextRVII`` (default, LMEye's): ``[BOS, image tokens, request x k, EOS]`` through the
  *frozen* open_clip text transformer (its causal mask, positional embeddings and final norm);
  the k outputs just before EOS (the request slots, which have seen every image token) go
  through the frozen ``text_projection``. Upstream takes the last 5 outputs including EOS (an
  off-by-one, REFERENCES §4); here they are exactly the request slots.
* ``TransformerRVII``: k learned queries plus the request vectors attend, with the image tokens,
  in a small trained transformer; no CLIP text tower is loaded. With ``model.request: prefix`` it
  also attends to the user's turn, the LLM's hidden state at each prefix position (the IPN
  projects them): instruction-aware, as InstructBLIP's Q-Former reads the instruction.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmeye.errors import UserError
from lmeye.patch_codec import pool_grid


def pool_tokens(tokens: torch.Tensor, most: int) -> torch.Tensor:
    """(B, T, D) -> at most ``most`` tokens by average pooling.

    A square T (a ViT's patch grid, row-major) is pooled in 2-D to a g x g grid, g = isqrt(most),
    so each pooled token is one region of the image: pooling along the flat token axis would
    average the end of one row with the start of the next, the image's two opposite edges, and
    the question "what is at the top left" would have no token to look at. Other T: 1-D pooling.
    """
    t = tokens.shape[1]
    if t <= most:
        return tokens
    side, g = math.isqrt(t), math.isqrt(most)
    if side * side == t and g > 0:  # the same regions as the extract stage's extract.patch_pool
        return pool_grid(tokens, g).to(tokens.dtype)
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), most).transpose(1, 2)


def center_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Each image token minus the image's mean token (``model.rvii_center_tokens``).

    A ViT's patch tokens share a large component, the whole image mixed in by every layer's
    attention, beside which the local part (the shape in this patch) is small. Attention that must
    pick the patch holding "the red circle" then compares nearly equal keys and learns slowly. With
    the shared part removed, the tokens differ by what is where. (The demo's features, RVII alone
    with a linear read-out, 600 steps: position 0.19 -> 0.73, shape 0.45 -> 0.74.) The mean itself
    still reaches the LLM: it is close to the pooled embedding the ``<img>`` slot carries.
    """
    return tokens - tokens.mean(dim=1, keepdim=True)


def image_regions(tokens: torch.Tensor, center: bool, most: int) -> torch.Tensor:
    """What both RVII kinds feed their image projection: the tokens, centred if asked, pooled to ``most``."""
    return pool_tokens(center_tokens(tokens) if center else tokens, most)


class ClipTextTower(nn.Module):
    """The frozen parts of an open_clip text tower that RVII needs (no vocabulary beyond BOS/EOS)."""

    def __init__(self, clip_model: nn.Module, sot_id: int, eot_id: int):
        super().__init__()
        text = getattr(clip_model, "text", clip_model)  # CustomTextCLIP keeps it under .text
        for name in ("transformer", "positional_embedding", "ln_final", "text_projection", "token_embedding"):
            if getattr(text, name, None) is None:
                raise UserError(f"CLIP model {type(clip_model).__name__}: its text tower has no {name} (RVII needs an open_clip text transformer)")
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        proj = text.text_projection
        self.text_projection = proj if isinstance(proj, nn.Module) else nn.Parameter(proj.detach().clone())
        self.positional_embedding = nn.Parameter(text.positional_embedding.detach().clone())
        with torch.no_grad():
            ends = text.token_embedding(torch.tensor([sot_id, eot_id]))
        self.bos_eos = nn.Parameter(ends.detach().clone())  # only these two rows of the vocabulary are used
        self.width = int(self.positional_embedding.shape[1])
        self.context_length = int(self.positional_embedding.shape[0])
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, middle: torch.Tensor, last: int) -> torch.Tensor:
        """(B, L, width) soft prompts -> (B, last, embed_dim): the final-norm outputs of the ``last``
        positions of ``middle`` (over [BOS, middle, EOS]) through ``text_projection``. The projection
        runs inside the forward: under ZeRO-3 a module's weights are gathered only while its forward
        runs, and a projection applied afterwards would see them released (shape [0])."""
        middle = middle.to(self.bos_eos.dtype)  # the tower runs in the model's dtype, the trained parts around it may not
        b, length = middle.shape[0], middle.shape[1] + 2
        if length > self.context_length:
            raise UserError(f"RVII sequence of {length} tokens exceeds the CLIP text context ({self.context_length}); lower model.rvii_image_tokens")
        bos, eos = self.bos_eos[:, None].expand(-1, b, -1)
        x = torch.cat([bos[:, None], middle, eos[:, None]], dim=1) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        x = self.ln_final(self.transformer(x, attn_mask=mask))[:, -1 - last : -1]
        return self.text_projection(x) if isinstance(self.text_projection, nn.Module) else x @ self.text_projection


class ClipTextRVII(nn.Module):
    """LMEye's RVII on a frozen CLIP text tower; trained: the image-token projection."""

    def __init__(self, tower: ClipTextTower, image_dim: int, num_img_d: int, max_image_tokens: int, center: bool = False):
        super().__init__()
        self.tower = tower
        self.num_img_d = num_img_d
        self.center = center
        self.max_image_tokens = min(max_image_tokens, tower.context_length - num_img_d - 2)
        self.image_proj = nn.Linear(image_dim, tower.width)
        self.request_width = tower.width
        self.out_dim = tower.embed_dim

    def forward(self, request: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """request (B, k, width), image_tokens (B, T, image_dim) -> (B, k, embed_dim)."""
        img = self.image_proj(image_regions(image_tokens, self.center, self.max_image_tokens))
        return self.tower(torch.cat([img, request], dim=1), last=self.num_img_d)


class TransformerRVII(nn.Module):
    """The trained alternative: k learned queries (+ request) and the image tokens in a small transformer."""

    def __init__(self, image_dim: int, num_img_d: int, width: int, layers: int, heads: int, max_image_tokens: int, center: bool = False):
        super().__init__()
        self.num_img_d = num_img_d
        self.max_image_tokens = max_image_tokens
        self.center = center
        self.image_proj = nn.Linear(image_dim, width)
        # where each image token is: attention alone is blind to order, and "where is the red circle?" asks it
        self.image_pos = nn.Parameter(torch.randn(max_image_tokens, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_img_d, width) * 0.02)
        self.kind = nn.Parameter(torch.zeros(2, width))  # image / query type embeddings
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.request_width = width
        self.out_dim = width

    def forward(self, request: torch.Tensor, image_tokens: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """request (B, k, width), image_tokens (B, T, image_dim) -> (B, k, width). With ``model.request:
        prefix``, ``context`` (B, P, width) is the user's turn as the LLM read it (projected, with its
        positions), first in the sequence; ``context_mask`` (B, P) marks its real tokens, so left
        padding is never attended and a row gives what it gives alone."""
        img = self.image_proj(image_regions(image_tokens, self.center, self.max_image_tokens))
        img = img + self.kind[0] + self.image_pos[: img.shape[1]]
        q = request + self.queries + self.kind[1]
        if context is None:
            return self.norm(self.encoder(torch.cat([img, q], dim=1))[:, -self.num_img_d :])
        seen = torch.ones(len(img), img.shape[1] + q.shape[1], dtype=torch.bool, device=img.device)
        pads = ~torch.cat([context_mask.bool(), seen], dim=1)
        out = self.encoder(torch.cat([context.to(img.dtype), img, q], dim=1), src_key_padding_mask=pads)
        return self.norm(out[:, -self.num_img_d :])


def check_clip_text(model: Optional[str], pretrained: Optional[str], config_dirs: list[str]) -> int:
    """Check, without loading weights, that ``model`` + ``pretrained`` build the text tower RVII needs:
    a known architecture, an existing file or a tag of it, and the activation its weights were trained
    with (open_clip would only warn, and that warning is muted while loading). Returns the tower's
    context length. One UserError naming the key."""
    import os

    import open_clip

    from lmeye.clip import ModelError, check_activation, register_model_configs, text_context_length

    if not model:
        raise UserError("model.clip_model is not set: the train stage takes the CLIP named by the features table's "
                        "manifest; elsewhere name it (and model.clip_pretrained)")
    register_model_configs(config_dirs)
    if open_clip.get_model_config(model.replace("/", "-")) is None and not model.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"model.clip_model {model!r}: no such open_clip architecture (add its JSON to configs/models/ or model.clip_model_config_dirs)")
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained):
        raise UserError(f"model.clip_pretrained {pretrained!r}: neither an existing file nor a pretrained tag of {model}")
    try:
        check_activation(model, pretrained, key="model.clip_model")
    except ModelError as err:
        raise UserError(str(err)) from None
    return text_context_length(model)


def load_clip_text_tower(model: str, pretrained: Optional[str], config_dirs: list[str], dtype: torch.dtype) -> ClipTextTower:
    """The frozen text tower of an open_clip model (the visual tower is dropped right after loading)."""
    import open_clip

    from lmeye.clip import DEMO_SEED, quiet_open_clip

    check_clip_text(model, pretrained, config_dirs)
    # Random weights (no pretrained) come from a fixed seed in a private RNG state: the frozen tower is
    # never saved, so every worker, and every later load of a trained IPN, must rebuild the very same
    # one (an unseeded tower differs per process and the trained projections around it mean nothing).
    # The seed is the demo extractor's, so the tower is the text half of the CLIP that made the features.
    with quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        clip = open_clip.create_model(model, pretrained=pretrained or None)
    tok = open_clip.get_tokenizer(model)
    tower = ClipTextTower(clip, getattr(tok, "sot_token_id", 49406), getattr(tok, "eot_token_id", 49407))
    del clip
    return tower.to(dtype).eval()
