"""The real ``Answerer``: a trained IPN (``lmeye.model``) with image features computed on the fly by
the extractor of the features table it was trained on (``lmeye.serve.encoder.ImageEncoder``, as chat).

Everything heavy is imported lazily, so ``lmeye.eval`` and its tests need neither torch nor a model.
``build_answerer`` is the one factory the ``lmeye eval`` command calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lmeye.errors import UserError

# images -> per image (pooled embedding (D,), patch tokens (T, D') or None), as the features table stores them
Featurize = Callable[[Sequence[Any]], list[tuple[np.ndarray, Optional[np.ndarray]]]]


class IPNAnswerer:
    """Answers a batch with one ``ipn.generate`` call (greedy) and ranks choices with ``ipn.score_choices``
    (one call per question: its choices are that call's batch)."""

    def __init__(self, ipn: Any, featurize: Featurize, feature_dim: int, max_new_tokens: int = 32, name: str = "ipn"):
        self.ipn = ipn
        self.featurize = featurize
        self.feature_dim = feature_dim
        self.max_new_tokens = max_new_tokens
        self.name = name

    def _features(self, images: Sequence[Any]) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
        # Each distinct image object once (MMBench asks an image N times, MME twice), in one encoder call.
        distinct = list({id(im): im for im in images if im is not None}.values())
        feats = dict(zip((id(im) for im in distinct), self.featurize(distinct))) if distinct else {}
        zero = (np.zeros(self.feature_dim, np.float32), None)
        return [feats[id(im)] if im is not None else zero for im in images]

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        encs = [self.ipn.encode([{"role": "user", "content": q}], im is not None, for_generation=True) for im, q in zip(images, questions)]
        fits = [i for i, e in enumerate(encs) if e is not None]  # a prompt that cannot fit: "" (scored wrong, unparsed)
        answers = [""] * len(questions)
        if not fits:
            return answers
        feats = self._features([images[i] for i in fits])
        emb = np.stack([f[0] for f in feats])
        shaped = next((f[1] for f in feats if f[1] is not None), None)
        # text-only rows' patch tokens are ignored by collate: zeros of the images' shape
        patches = None if shaped is None else np.stack([np.zeros_like(shaped) if f[1] is None else f[1] for f in feats])
        batch = self.ipn.collate([encs[i] for i in fits], emb, patches)
        texts = self.ipn.generate(batch, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        for i, text in zip(fits, texts):
            answers[i] = text
        return answers

    def choice_loglik(self, images: Sequence[Any], questions: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        feats = self._features(images)
        out = []
        for image, question, options, (emb, patches) in zip(images, questions, choices, feats):
            conversation = [{"role": "user", "content": question}]
            try:  # summed log-probability per choice
                scores = self.ipn.score_choices(conversation, list(options), embedding=emb if image is not None else None,
                                                patch_tokens=patches if image is not None else None)
            except UserError:
                out.append([float("-inf")] * len(options))  # a choice cannot fit max_length: scored wrong
                continue
            out.append([float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)])
        return out


def encoder_featurizer(encoder: Any) -> tuple[Featurize, int]:
    """Images through ``lmeye.serve.encoder.ImageEncoder`` in one call (the extractor of the features
    table the model was trained on, with its preprocessing and stored dtype): (featurize, dim)."""

    def featurize(images: Sequence[Any]) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
        emb, tokens = encoder.encode(list(images))
        return [(emb[i], None if tokens is None else tokens[i]) for i in range(len(images))]

    return featurize, int(encoder.dim)


def build_answerer(checkpoint: str | Path, max_new_tokens: int = 32, features: Optional[str] = None) -> IPNAnswerer:
    """Load the IPN saved in ``checkpoint`` and the image encoder of its features table (``features``,
    else the table its ``ipn_config.json`` names), as chat does (``lmeye.serve.loader``)."""
    from lmeye.serve.encoder import ImageEncoder
    from lmeye.serve.loader import load_ipn_dir

    path = str(checkpoint)
    table = features_check(path, features)
    ipn = load_ipn_dir(path)
    featurize, dim = encoder_featurizer(ImageEncoder(table))
    return IPNAnswerer(ipn, featurize, dim, max_new_tokens=max_new_tokens, name=model_name(path))


def features_check(checkpoint: str | Path, features: Optional[str] = None) -> str:
    """The features table to encode images with; checks the folder is a checkpoint (a UserError naming it)."""
    from lmeye.serve.loader import CONFIG_FILE, features_table_of

    table = features_table_of(str(checkpoint), features)
    if table is None:
        raise UserError(f"{checkpoint}/{CONFIG_FILE}: names no features table; pass the one the model was trained on "
                        "(--features TABLE) so images are encoded the same way")
    return table


def model_name(checkpoint: str) -> str:
    """The checkpoint folder and the newest modification time inside it: a retrained model in the same
    folder is another model, so ``lmeye eval`` does not resume from its predecessor's answers."""
    files = [p for p in Path(checkpoint).rglob("*") if p.is_file()]
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    return f"{Path(checkpoint).resolve()}@{newest}"
