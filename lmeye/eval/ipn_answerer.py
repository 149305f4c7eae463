"""The real ``Answerer``: a trained IPN (``lmeye.model``, see IPN_CONTRACT) with image features computed
on the fly by the CLIP visual tower the features table was made with.

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


def clip_featurizer(model_cfg: Any, output_tokens: bool) -> tuple[Featurize, int]:
    """The visual tower and preprocessing of extract (``lmeye.clip``), fp32 on CPU: (featurize, dim)."""
    import torch
    from PIL import Image

    from lmeye import clip

    visual, preprocess = clip.load_visual(
        model_cfg.clip_model, model_cfg.clip_pretrained,
        config_dirs=getattr(model_cfg, "clip_model_config_dirs", ()) or (), output_tokens=output_tokens,
    )
    pil_part, tensor_steps = clip.split_transform(preprocess)
    size = tuple(visual.preprocess_cfg["size"]) if isinstance(visual.preprocess_cfg["size"], (tuple, list)) else (visual.preprocess_cfg["size"],) * 2

    def featurize(image: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        pixels = clip.to_pixels(pil_part, image, size)[None]
        with torch.inference_mode():
            out = visual(clip.pixels_to_tensor(pixels, tensor_steps))
        pooled, tokens = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        emb = torch.nn.functional.normalize(pooled.float(), dim=-1)[0].numpy()
        return emb, None if tokens is None else tokens[0].float().numpy()

    probe, _ = featurize(Image.new("RGB", size))
    return featurize, int(probe.shape[-1])


def build_answerer(checkpoint: str | Path, max_new_tokens: int = 32) -> IPNAnswerer:
    """Load the IPN saved in ``checkpoint`` (``load_ipn``) and the CLIP tower its config names."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found")
    from lmeye.model import load_ipn

    ipn = load_ipn(str(path))
    ipn.eval()
    featurize, dim = clip_featurizer(ipn.cfg, output_tokens=getattr(ipn, "patch_shape", None) is not None)
    return IPNAnswerer(ipn, featurize, dim, max_new_tokens=max_new_tokens)
