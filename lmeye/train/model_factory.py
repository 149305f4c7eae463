"""Where the trainer gets its model: one small object, so tests can hand in another one.

The trainer never imports ``lmeye.model`` itself. It calls a factory (``IPNFactory`` unless the
caller of ``pipelines.train.run`` passes its own), which is pickled into every Ray Train worker
with the loop's config. The factory:

* ``check(cfg)``: fails with one ``UserError`` when the model section names an LLM that is not
  there (run on the driver, before any worker starts);
* ``build(cfg, feature_dim, patch_shape)``: a fresh IPN (frozen LLM and CLIP, new trainable weights);
* ``load(directory)``: an IPN from a model directory (safetensors + JSON, nothing unpickled);
* ``feature_shape(directory)``: the ``(feature_dim, patch_shape)`` a model directory was built for,
  so a features table of another width is refused before training starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from lmeye.errors import UserError

IPN_CONFIG = "ipn_config.json"


class IPNFactory:
    """The real IPN of ``lmeye.model`` (see /IPN contract)."""

    def check(self, cfg: Any) -> None:
        model_cfg = getattr(cfg, "model", None)
        if model_cfg is None:
            raise UserError("model: the config has no model section; the train stage needs one (model.llm)")
        llm = model_cfg.llm
        if not llm:
            raise UserError("model.llm: not set; name the frozen LLM's directory (the demo builds one: lmeye.model.demo)")
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(llm)
        except (OSError, ValueError) as err:
            raise UserError(f"model.llm: cannot load an LLM config from {llm!r} ({str(err).splitlines()[0]})") from None
        check_chat_template(model_cfg)

    def build(self, cfg: Any, feature_dim: int, patch_shape: Optional[tuple[int, int]]) -> Any:
        from lmeye.model import IPN

        return IPN.from_config(cfg.model, feature_dim=feature_dim, patch_shape=patch_shape)

    def load(self, directory: str) -> Any:
        from lmeye.model import load_ipn

        return load_ipn(directory)

    def feature_shape(self, directory: str) -> tuple[Optional[int], Optional[tuple[int, int]]]:
        return feature_shape_from_json(os.path.join(directory, IPN_CONFIG))


def check_chat_template(model_cfg: Any) -> None:
    """One UserError naming ``model.chat_template`` when the tokenizer has no usable chat template
    and none is configured (a base model), before any worker loads the LLM."""
    from transformers import AutoTokenizer

    from lmeye.model.text import resolve_chat_template

    where = model_cfg.tokenizer or model_cfg.llm
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {where!r} ({str(err).splitlines()[0]})") from None
    resolve_chat_template(tok, model_cfg.chat_template)


def feature_shape_from_json(path: str) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """``feature_dim`` and ``patch_shape`` as an ``ipn_config.json`` records them (None when absent)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{os.path.dirname(path)}: not a model directory (no {os.path.basename(path)})") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    dim = meta.get("feature_dim")
    shape = meta.get("patch_shape")
    return (int(dim) if dim is not None else None, tuple(shape) if shape else None)
