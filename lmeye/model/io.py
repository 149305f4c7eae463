"""An IPN on disk: a directory with ``ipn_config.json`` and ``ipn.safetensors``; never a pickle.

The JSON names the frozen LLM and CLIP (they are referenced by path or name, not copied), the
whole ``model:`` section, the feature shapes the IPN was built for, the `features` table it was
trained on (when trained by the train stage), and every saved weight's shape. Loading
(``lmeye.model.build.load_ipn``) rebuilds the IPN from that config and checks the weights' names and
shapes against both the JSON and the freshly built model before copying them in.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

from lmeye.errors import UserError

CONFIG_FILE = "ipn_config.json"
WEIGHTS_FILE = "ipn.safetensors"
FORMAT = "lingcloud-ipn"
VERSION = 1


def ipn_config(ipn) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": ipn.cfg.model_dump(mode="json"),
        "feature_dim": ipn.feature_dim,
        "patch_shape": list(ipn.patch_shape) if ipn.patch_shape else None,
        # the table whose extractor encodes new images for this model (chat, eval); set by training
        "features": getattr(ipn, "features_table", None),
        "llm": {"name_or_path": ipn.cfg.llm, "class": type(ipn.llm).__name__, "hidden_size": ipn.hidden},
        "clip": {"model": ipn.cfg.clip_model, "pretrained": ipn.cfg.clip_pretrained} if ipn.cfg.rvii == "clip_text" else None,
        "weights": {n: list(t.shape) for n, t in ipn.trainable_state_dict().items()},
    }


def save_ipn(ipn, directory: str) -> str:
    """Write the IPN's own weights and its config; each file is written whole then renamed."""
    from safetensors.torch import save

    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    state = {n: t.detach().contiguous().cpu() for n, t in ipn.trainable_state_dict().items()}
    for name, blob in ((WEIGHTS_FILE, save(state, metadata={"format": FORMAT})), (CONFIG_FILE, json.dumps(ipn_config(ipn), indent=2).encode())):
        tmp = f"{root}/{name}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, blob)
        fs.mv(tmp, f"{root}/{name}")
    return directory


def read_config(directory: str) -> dict[str, Any]:
    path = f"{directory.rstrip('/')}/{CONFIG_FILE}"
    try:
        with fsspec.open(path, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (not an IPN directory)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}")
    return meta


def read_weights(directory: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The saved weights of ``directory``, checked against the names and shapes its config (``meta``) lists."""
    from safetensors.torch import load

    path = f"{directory.rstrip('/')}/{WEIGHTS_FILE}"
    try:
        with fsspec.open(path, "rb") as f:
            state = load(f.read())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    listed = {n: list(s) for n, s in meta["weights"].items()}
    stored = {n: list(t.shape) for n, t in state.items()}
    if listed != stored:
        bad = sorted(set(listed) ^ set(stored)) or [n for n in listed if listed[n] != stored[n]]
        raise UserError(f"{path}: weights do not match {CONFIG_FILE} (e.g. {bad[:5]})")
    return state
