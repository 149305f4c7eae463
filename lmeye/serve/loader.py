"""The one place serving code gets a model from: a checkpoint folder -> ``Assistant``.

A checkpoint folder is what ``IPN.save_pretrained`` writes (``ipn_config.json`` naming the LLM and
CLIP, plus the trainable weights as safetensors). Images are encoded with the extractor of the
`features` table the model was trained on: ``features=`` names it, else the ``features`` key of
``ipn_config.json``. Heavy imports (torch, transformers, the model) happen here, lazily.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Optional

from lmeye.errors import UserError

CONFIG_FILE = "ipn_config.json"


class CheckpointError(UserError):
    """A checkpoint folder that is missing or incomplete; the message names the path."""


def read_checkpoint_config(directory: str) -> dict[str, Any]:
    """``ipn_config.json`` of a checkpoint folder, after checking the folder has its files."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (not an IPN checkpoint folder written by save_pretrained?)")
    if not glob.glob(os.path.join(directory, "*.safetensors")):
        raise CheckpointError(f"{directory}: missing the IPN weights (no *.safetensors file)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def load_ipn_dir(directory: str):
    """The IPN of a checkpoint folder (LLM and CLIP text tower included), in eval mode."""
    cfg = read_checkpoint_config(directory)
    if cfg.get("kind") == "lingcloud-fake-ipn":
        from lmeye.serve.testing import FakeIPN

        return FakeIPN()
    from lmeye.model import load_ipn

    ipn = load_ipn(directory)
    if hasattr(ipn, "eval"):
        ipn.eval()
    return ipn


def features_table_of(directory: str, features: Optional[str] = None) -> Optional[str]:
    """The features table whose extractor encodes this checkpoint's images (None: not named)."""
    return features or read_checkpoint_config(directory).get("features") or None


def load_assistant(
    checkpoint_dir: str,
    *,
    features: Optional[str] = None,
    images: bool = True,
    model_config_dirs: Iterable[str] = (),
):
    """An ``Assistant`` for the checkpoint. ``images=False`` skips the image encoder (text only)."""
    from lmeye.serve.chat import Assistant
    from lmeye.serve.encoder import ImageEncoder

    table = features_table_of(checkpoint_dir, features)
    if images and table is None:
        raise CheckpointError(
            f"{os.path.join(checkpoint_dir, CONFIG_FILE)}: names no features table; pass the one the model was "
            "trained on (--features TABLE) so images are encoded the same way"
        )
    encoder = ImageEncoder(table, model_config_dirs) if images else None
    return Assistant(load_ipn_dir(checkpoint_dir), encoder, checkpoint=checkpoint_dir)
