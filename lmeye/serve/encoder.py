"""Image features on the fly, computed exactly as the `features` table's were.

``ImageEncoder.from_features(TABLE)`` rebuilds the extraction stage's model actor from what the
table's manifest records (architecture, weights and their checksum, precision, stored dtype,
patch tokens, preprocessing) and runs the stage's own code on one image: its decoder with the PIL
half of the preprocessing (``pipelines.extract.decode_image``), then its actor's forward (tensor
half, visual tower, L2 norm, cast to the stored dtype). Nothing is re-implemented here, so a
question's image gets the features that image has in the table, bit for bit.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from lmeye import clip, patch_codec
from lmeye.config import ExtractConfig
from lmeye.errors import UserError
from lmeye.serve.images import ImageError, ImageInput, describe, read_bytes
from lmeye.tables import TableReader
from schemas.features import FEATURES

_SEED = re.compile(r"seed[= ](\d+)")
_PATCH_DTYPE = {enc: dtype for dtype, enc in patch_codec.BY_DTYPE.items()}  # recorded encoding -> extract.patch_dtype


def extract_config_of(path: str, model_config_dirs: Iterable[str] = ()) -> tuple[ExtractConfig, dict]:
    """The extract settings that wrote the features table at ``path``, and its recorded content config."""
    manifest = TableReader(path, FEATURES).manifest  # checks it is a finished features table
    content, meta = manifest.config, manifest.metadata
    try:
        pretrained = meta["pretrained"]
        seed_match = _SEED.search(content["weights"]) or _SEED.search(pretrained)
        ec = ExtractConfig(
            input=None, output=path, model=content["model"],
            pretrained=None if pretrained.startswith("none (") else pretrained,
            seed=int(seed_match.group(1)) if seed_match else 0,
            precision=content["precision"], dtype=content["dtype"], patch_tokens=content["patch_tokens"],
            patch_dtype=_PATCH_DTYPE.get(content.get("patch_encoding")), patch_pool=content.get("patch_pool"),
            text_embeddings=content.get("text_embeddings", False), model_config_dirs=list(model_config_dirs),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}/_manifest.json: does not record how its features were extracted ({err})") from None
    return ec, content


class ImageEncoder:
    """The extraction stage's model actor, in this process, for a few images at a time."""

    def __init__(self, features_path: str, model_config_dirs: Iterable[str] = ()):
        from pipelines import extract

        ec, recorded = extract_config_of(features_path, model_config_dirs)
        try:
            spec = clip.probe_model(ec.model, ec.pretrained, seed=ec.seed, config_dirs=ec.model_config_dirs)
        except clip.ModelError as err:
            raise UserError(f"{features_path}: its image encoder cannot be loaded: {err}") from None
        if extract.content_config(ec, spec, ec.precision) != recorded:
            raise UserError(
                f"{features_path}: the image encoder on disk ({ec.model}, {ec.pretrained or 'random init'}) no longer "
                "matches the one that wrote this table (weights or preprocessing changed); re-extract the features"
            )
        self.features_path = features_path
        self.spec = spec
        self.patch_tokens = ec.patch_tokens
        self._pil_part = extract.pil_part_of(spec)
        # the table's own settings, on this process's CPU threads (no Ray here), no debug delay, images only
        settings = {**extract.encoder_settings(ec, ec.precision),
                    "torch_threads": os.cpu_count() or 1, "num_gpus": 0, "debug_delay_s": 0, "text_embeddings": False}
        self._actor = extract.local_encoder(spec, settings)
        self._decode = extract.decode_image

    @property
    def dim(self) -> int:
        return self.spec.embed_dim

    @property
    def patch_shape(self) -> Optional[tuple[int, int]]:
        """(T, D) as the table stores them (after its ``patch_pool``)."""
        return self._actor.token_shape if self.patch_tokens else None

    def pixels(self, image: ImageInput) -> np.ndarray:
        """HxWx3 uint8 through the PIL half of the model's preprocessing, as the extraction stage decodes."""
        size = self.spec.image_size
        try:
            if hasattr(image, "convert") and not isinstance(image, (str, bytes)):  # a PIL image
                return clip.to_pixels(self._pil_part, image, size)
            return self._decode(read_bytes(image), self._pil_part, size)
        except ImageError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever PIL raises for a bad file, named by its source
            raise ImageError(f"{describe(image)}: not an image that can be opened ({err})") from None

    def encode(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(N, D) embeddings and (N, T, D') patch tokens (None when the table has none), stored dtype."""
        pixels = np.stack([self.pixels(img) for img in images])
        emb, tokens = self._actor.encode_pixels(pixels)
        if tokens is not None:
            # through the table's encoding, so a live image reaches the IPN as a stored one would
            tokens = self._actor.patch_codec.roundtrip(tokens.reshape(len(images), *self._actor.token_shape))
        return emb, (tokens if self.patch_tokens else None)
