"""Where the trainer gets its model: one small object, so tests can hand in another one.

The trainer never imports ``lmeye.model`` itself. It calls a factory (``IPNFactory`` unless the
caller of ``pipelines.train.run`` passes its own), which is pickled into every Ray Train worker
with the loop's config. The factory:

* ``check(cfg, features)``: fails with one ``UserError`` when the model section cannot train on
  the features table (``lmeye.train.preflight``; run on the driver, before any worker starts);
* ``build(cfg, feature_dim, patch_shape)``: a fresh IPN (frozen LLM and CLIP, new trainable weights);
* ``load(directory)``: an IPN from a model directory (safetensors + JSON, nothing unpickled);
* ``feature_shape(directory)``: the ``(feature_dim, patch_shape)`` a model directory was built for,
  so a features table of another width is refused before training starts.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from lmeye.errors import UserError

IPN_CONFIG = "ipn_config.json"


class IPNFactory:
    """The real IPN of ``lmeye.model`` (see /IPN contract)."""

    def check(self, cfg: Any, features: Any) -> None:
        """The driver's preflight of the model against the features table (lmeye.train.preflight)."""
        from lmeye.train.preflight import check_model

        check_model(cfg.model, features)

    def build(self, cfg: Any, feature_dim: int, patch_shape: Optional[tuple[int, int]]) -> Any:
        from lmeye.model import build_ipn

        return build_ipn(cfg.model, feature_dim=feature_dim, patch_shape=patch_shape)

    def load(self, directory: str, dtype: Optional[str] = None) -> Any:
        """``dtype``: the frozen LLM's and CLIP's (``model.dtype``) instead of the one saved."""
        from lmeye.model import load_ipn

        return load_ipn(directory, **({"dtype": dtype} if dtype else {}))

    def feature_shape(self, directory: str) -> tuple[Optional[int], Optional[tuple[int, int]]]:
        return feature_shape_from_json(f"{directory.rstrip('/')}/{IPN_CONFIG}")


TRAINING_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def training_dtype(cfg: Any) -> str:
    """The ``model.dtype`` a worker loads the frozen LLM and CLIP in: the training precision's, so a
    bf16 run of a 7B LLM holds one bf16 copy per worker (about 14 GB) from the start, not an fp32 one
    (28 GB) that DeepSpeed casts later."""
    return TRAINING_DTYPES[cfg.train.precision]


def in_training_dtype(cfg: Any) -> Any:
    """``cfg`` with ``model.dtype`` set to :func:`training_dtype` (configs without a model section as they are)."""
    if getattr(cfg, "model", None) is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": training_dtype(cfg)})})


def feature_shape_from_json(path: str) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """``feature_dim`` and ``patch_shape`` as an ``ipn_config.json`` records them (None when absent; any fsspec path)."""
    from lmeye.train.storage import read_text

    text = read_text(path)
    if text is None:
        raise UserError(f"{path.rsplit('/', 1)[0]}: not a model directory (no {path.rsplit('/', 1)[-1]})")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    dim = meta.get("feature_dim")
    shape = meta.get("patch_shape")
    return (int(dim) if dim is not None else None, tuple(shape) if shape else None)
