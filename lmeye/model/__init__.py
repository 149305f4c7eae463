"""The IPN (LMEye's Interactive Perception Network) around a frozen causal LLM and CLIP.

Read in this order: ``text`` (conversations -> token ids, slots, loss mask, truncation),
``rvii`` (request-based visual interaction), ``ipn`` (the module: mapping, request, RVII,
transmission, the two passes), ``seq2seq`` (the encoder-decoder variant), ``io`` (the directory
format), ``build`` (a fresh or saved IPN of the right class), ``demo`` (the offline tiny LLM),
``describe`` (parameter counts).
"""

from importlib import import_module
from typing import Any

# Resolved on first use, so that ``lmeye.model.ipn`` imports with torch and transformers alone (no
# pydantic, open_clip or Ray: benchmarks/train_gpu.py runs it on a bare GPU machine).
_EXPORTS = {"IPN": "lmeye.model.ipn", "IPNOutput": "lmeye.model.ipn", "ModelConfig": "lmeye.config.model",
            "build_ipn": "lmeye.model.build", "load_ipn": "lmeye.model.build"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmeye.model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


__all__ = ["IPN", "IPNOutput", "ModelConfig", "build_ipn", "load_ipn"]
