"""Building an IPN: fresh from a ``model:`` config (``build_ipn``) or from a model directory (``load_ipn``).

The one place that picks the IPN class for the LLM (``Seq2SeqIPN`` when it is an encoder-decoder)
and that turns a saved directory into a model, so that ``lmeye.model.ipn`` imports neither its
subclass nor the loader: every import between the model's modules goes one way.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lmeye.model.io import read_config, read_weights
from lmeye.model.ipn import DTYPES, IPN, load_llm
from lmeye.model.rvii import load_clip_text_tower
from lmeye.model.seq2seq import Seq2SeqIPN


def build_ipn(cfg: Any, feature_dim: int, patch_shape: Optional[Sequence[int]] = None) -> IPN:
    """A fresh IPN (weights from ``cfg.seed``) around the configured frozen LLM and CLIP text tower;
    ``cfg``: a ``ModelConfig``."""
    llm, tok = load_llm(cfg)
    tower = None
    if cfg.rvii == "clip_text":
        tower = load_clip_text_tower(cfg.clip_model, cfg.clip_pretrained, cfg.clip_model_config_dirs, DTYPES[cfg.dtype])
    cls = Seq2SeqIPN if llm.config.is_encoder_decoder else IPN
    return cls(cfg, feature_dim, tuple(patch_shape) if patch_shape else None, llm, tok, tower)


def load_ipn(directory: str, **overrides: Any) -> IPN:
    """Rebuild an IPN from ``directory`` (``overrides`` replace ``model:`` keys, e.g. a moved ``llm`` path)."""
    from lmeye.config.model import ModelConfig

    meta = read_config(directory)
    cfg = ModelConfig.model_validate({**meta["model"], **overrides})
    state = read_weights(directory, meta)
    ipn = build_ipn(cfg, meta["feature_dim"], meta["patch_shape"])
    ipn.load_trainable_state_dict(state)
    ipn.features_table = meta.get("features")
    return ipn
