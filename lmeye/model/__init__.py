"""The IPN (LMEye's Interactive Perception Network) around a frozen causal LLM and CLIP.

Read in this order: ``text`` (conversations -> token ids, slots, loss mask, truncation),
``rvii`` (request-based visual interaction), ``ipn`` (the module: mapping, request, RVII,
transmission, the two passes), ``io`` (save/load), ``demo`` (the offline tiny LLM),
``describe`` (parameter counts).
"""

from lmeye.config.model import ModelConfig
from lmeye.model.io import load_ipn
from lmeye.model.ipn import IPN, IPNOutput

__all__ = ["IPN", "IPNOutput", "ModelConfig", "load_ipn"]
