"""The real ``Answerer``: a trained IPN (``lmeye.model``) with image features computed on the fly by
the extractor of the features table it was trained on (``lmeye.serve.encoder.ImageEncoder``, as chat).

Everything heavy is imported lazily, so ``lmeye.eval`` and its tests need neither torch nor a model.
``build_answerer`` is the one factory the ``lmeye eval`` command calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lmeye.errors import UserError

# image -> (pooled embedding (D,), patch tokens (T, D') or None), as the features table stores them
Featurize = Callable[[Any], tuple[np.ndarray, Optional[np.ndarray]]]


class IPNAnswerer:
    """Answers with ``ipn.generate`` (greedy) and ranks choices with ``ipn.score_choices``."""

    def __init__(self, ipn: Any, featurize: Featurize, feature_dim: int, max_new_tokens: int = 32):
        self.ipn = ipn
        self.featurize = featurize
        self.feature_dim = feature_dim
        self.max_new_tokens = max_new_tokens
        self._last: tuple[Any, tuple] | None = None  # (image, its features): MMBench asks each image N times

    def _features(self, image: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        # Identity, not equality: the held reference keeps the object (and its id) alive.
        if self._last is None or self._last[0] is not image:
            self._last = (image, self.featurize(image))
        return self._last[1]

    def _batch(self, image: Any, question: str) -> Optional[dict]:
        has_image = image is not None
        conversation = [{"role": "user", "content": question}]
        enc = self.ipn.encode(conversation, has_image, for_generation=True)
        if enc is None:
            return None  # the prompt cannot fit max_length: no answer (scored wrong, as unparsed)
        if has_image:
            emb, patches = self._features(image)
        else:
            emb, patches = np.zeros(self.feature_dim, np.float32), None
        return self.ipn.collate([enc], emb[None], None if patches is None else patches[None])

    def answer(self, image: Any, question: str) -> str:
        batch = self._batch(image, question)
        if batch is None:
            return ""
        texts = self.ipn.generate(batch, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return texts[0]

    def choice_loglik(self, image: Any, question: str, choices: list[str]) -> list[float]:
        conversation = [{"role": "user", "content": question}]
        emb, patches = self._features(image) if image is not None else (None, None)
        try:  # summed log-probability per choice
            scores = self.ipn.score_choices(conversation, choices, embedding=emb, patch_tokens=patches)
        except UserError:
            return [float("-inf")] * len(choices)  # a choice cannot fit max_length: scored wrong
        return [float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)]


def encoder_featurizer(encoder: Any) -> tuple[Featurize, int]:
    """One image at a time through ``lmeye.serve.encoder.ImageEncoder`` (the extractor of the features
    table the model was trained on, with its preprocessing and stored dtype): (featurize, dim)."""

    def featurize(image: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        emb, tokens = encoder.encode([image])
        return emb[0], None if tokens is None else tokens[0]

    return featurize, int(encoder.dim)


def build_answerer(checkpoint: str | Path, max_new_tokens: int = 32, features: Optional[str] = None) -> IPNAnswerer:
    """Load the IPN saved in ``checkpoint`` and the image encoder of its features table (``features``,
    else the table its ``ipn_config.json`` names), as chat does (``lmeye.serve.loader``)."""
    from lmeye.serve.encoder import ImageEncoder
    from lmeye.serve.loader import CONFIG_FILE, features_table_of, load_ipn_dir

    path = str(checkpoint)
    table = features_table_of(path, features)  # also checks the folder is a checkpoint
    if table is None:
        raise UserError(f"{path}/{CONFIG_FILE}: names no features table; pass the one the model was trained on "
                        "(--features TABLE) so images are encoded the same way")
    ipn = load_ipn_dir(path)
    featurize, dim = encoder_featurizer(ImageEncoder(table))
    return IPNAnswerer(ipn, featurize, dim, max_new_tokens=max_new_tokens)
