"""The train stage's checks on the driver, before any worker starts (``pipelines.train`` calls them).

A mistake found inside a worker costs every worker an LLM load first (minutes for a 7B model), and
Ray Train's ``FailureConfig`` then restarts the worker group ``train.max_failures`` times to meet
the same error again. Everything that can be known from the config, the model files and the
features table's metadata is checked here instead, each check one function and one ``UserError``
line naming the key or path:

* ``check_outputs``: ``train.output`` is writable (a probe file written and removed, through fsspec);
* ``with_table_clip``: ``model.clip_model: null`` takes the CLIP that made the features table;
* ``check_llm``: the LLM's config loads and its architecture is one the IPN runs;
* ``check_tokenizer``: the tokenizer loads and its chat template (or ``model.chat_template``) lays
  out a training sample that fits ``model.max_length``;
* ``check_clip``: RVII's CLIP resolves (architecture, tag or file) with the activation its weights
  were trained with;
* ``check_features``: the features' patch grid fits RVII (its CLIP text context, region pooling);
* ``check_init_features``: an ``init_from`` model was built for features of this width and grid.

Nothing here loads weights: configs, the tokenizer and open_clip's tables only.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any, Optional

from lmeye.errors import UserError


def check_outputs(output: str) -> None:
    """``train.output`` takes files: a probe file is written and removed there (any fsspec path)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    probe = f"{path.rstrip('/')}/.preflight-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except (OSError, PermissionError) as err:
        raise UserError(f"train.output {output!r}: not writable ({type(err).__name__}: {err})") from None


def with_table_clip(model_cfg: Any, metadata: dict[str, str], table: str) -> Any:
    """``model_cfg`` with RVII's CLIP taken from the features table when ``model.clip_model`` is null:
    the text tower is then the other half of the CLIP whose image features RVII reads."""
    from lmeye.clip import table_clip

    if model_cfg.rvii != "clip_text" or model_cfg.clip_model is not None:
        return model_cfg
    if model_cfg.clip_pretrained is not None:
        raise UserError("model.clip_pretrained is set but model.clip_model is null; name both, or neither "
                        "to take the features table's CLIP")
    model, pretrained = table_clip(metadata)
    if model is None:
        raise UserError(f"model.clip_model: null, and the features table {table} names no CLIP model; set model.clip_model")
    return model_cfg.model_copy(update={"clip_model": model, "clip_pretrained": pretrained})


def check_llm(model_cfg: Any) -> Any:
    """The LLM's ``transformers`` config (no weights), once its architecture is known to be supported."""
    from lmeye.model.ipn import llm_config

    return llm_config(model_cfg)


def check_tokenizer(model_cfg: Any, llm_cfg: Any) -> None:
    """The tokenizer loads, and its chat template renders a training sample that fits ``max_length``."""
    from lmeye.model.ipn import config_context, load_tokenizer
    from lmeye.model.text import check_template

    tok = load_tokenizer(model_cfg)
    check_template(tok, num_img=model_cfg.num_img, num_img_d=model_cfg.num_img_d,
                   max_length=min(model_cfg.max_length, config_context(llm_cfg)), system_prompt=model_cfg.system_prompt,
                   chat_template=model_cfg.chat_template)  # a name or .jinja file, resolved by lmeye.model.templates


def check_clip(model_cfg: Any) -> Optional[int]:
    """RVII's CLIP resolves with its weights' activation; returns its text context (None: no CLIP text RVII)."""
    if model_cfg.rvii != "clip_text":
        return None
    from lmeye.model.rvii import check_clip_text

    return check_clip_text(model_cfg.clip_model, model_cfg.clip_pretrained, model_cfg.clip_model_config_dirs)


def check_features(model_cfg: Any, clip_context: Optional[int], features: Any) -> None:
    """The features' image tokens fit RVII: with the request slots they fit the CLIP text context,
    and more tokens than ``rvii_image_tokens`` form a square grid that can be pooled by image region."""
    k = model_cfg.num_img_d
    if clip_context is not None and model_cfg.rvii_image_tokens + k + 2 > clip_context:
        raise UserError(
            f"model.rvii_image_tokens {model_cfg.rvii_image_tokens} + num_img_d {k} + BOS/EOS exceed the CLIP text "
            f"context of {model_cfg.clip_model} ({clip_context}); lower model.rvii_image_tokens to at most {clip_context - k - 2}"
        )
    patch = features.patch_shape
    if patch is None:
        return
    tokens = int(patch[0])
    if tokens > model_cfg.rvii_image_tokens and math.isqrt(tokens) ** 2 != tokens:
        raise UserError(
            f"features {features.path}: {tokens} patch tokens are not a square grid, so RVII cannot pool them into "
            f"model.rvii_image_tokens {model_cfg.rvii_image_tokens} image regions; set rvii_image_tokens to {tokens}"
        )


def check_model(model_cfg: Any, features: Any) -> None:
    """Every model check, in the order a worker would meet them."""
    llm_cfg = check_llm(model_cfg)
    check_tokenizer(model_cfg, llm_cfg)
    check_features(model_cfg, check_clip(model_cfg), features)


def check_init_features(stage: str, init_dir: str, shape: tuple[Optional[int], Any], features: Any) -> None:
    """An ``init_from`` model (``shape``: the feature dim and patch shape it was built for) fits the features table."""
    dim, patch = shape
    if dim is not None and dim != features.dim:
        raise UserError(
            f"train stage {stage}: {init_dir} was built for {dim}-d features, but {features.path} holds "
            f"{features.dim}-d features (model {features.model or '?'}); use the features it was trained on"
        )
    if patch is not None and features.patch_shape is not None and tuple(patch) != tuple(features.patch_shape):
        raise UserError(
            f"train stage {stage}: {init_dir} was built for patch tokens {tuple(patch)}, "
            f"but {features.path} holds {tuple(features.patch_shape)}"
        )


__all__ = ["check_clip", "check_features", "check_init_features", "check_llm", "check_model", "check_outputs",
           "check_tokenizer", "with_table_clip"]
