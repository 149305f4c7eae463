"""`features`: the frozen CLIP image features of every successful `pairs` row, by uid.

One row per ``status == success`` row of the pairs table it was derived from (same shard
names). An image that fails to decode here is a row with ``status = failed_to_decode``, its
reason in ``error_message`` and a null ``embedding``: failures are data.

* ``embedding``: the pooled image embedding, L2-normalised, ``fixed_size_list<float16|float32, D>``.
* ``patch_tokens`` (optional, only when the stage was asked for them): the visual tower's token
  features, ``fixed_size_list<float16|float32, T*D>``; the shape ``T,D`` is in the schema
  metadata (``lingcloud.patch_tokens_shape``).

Table facts live in the Parquet schema metadata and in the manifest's ``metadata``, under the
keys in ``META_KEYS``: model name, pretrained tag or path, checkpoint sha256, image size, dtype,
embedding width, precision and the patch-token shape.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from schemas import UID128_NOTE, TableSchema
from schemas.pairs import SUCCESS  # noqa: F401  (one word for success across tables)
FAILED_TO_DECODE = "failed_to_decode"
# Optional column (extract.text_embeddings: true): the caption's CLIP text embedding, L2-normalised,
# the same fixed_size_list type as ``embedding``; null for a row without a caption or a failed image.
TEXT_EMBEDDING = "text_embedding"

VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32()}

# metadata keys (manifest.metadata and Parquet schema metadata, "lingcloud." prefix in the latter)
META_KEYS = (
    "model", "pretrained", "checkpoint_sha256", "image_size", "dtype", "embed_dim", "precision", "patch_tokens_shape",
)


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and t.value_type in (pa.float16(), pa.float32()) and t.list_size > 0


FEATURES = TableSchema(
    name="features",
    version=2,  # 2: 128-bit uids
    migrations={1: UID128_NOTE},
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            # placeholder width: the real one is fixed per run, checked by the rule below
            pa.field("embedding", pa.list_(pa.float16(), 1)),
        ]
    ),
    type_rules={"embedding": _is_vector},
    rules_doc={"embedding": "fixed_size_list<float16 or float32, D>"},
)


def features_schema(
    embed_dim: int,
    dtype: str = "float16",
    patch_shape: Optional[tuple[int, int]] = None,
    metadata: Optional[dict[str, str]] = None,
    text_embeddings: bool = False,
) -> pa.Schema:
    """The exact schema of one run: embedding width, value type, optional patch tokens and caption
    embeddings, metadata."""
    value = VALUE_TYPES[dtype]
    fields = list(FEATURES.schema)[:3] + [pa.field("embedding", pa.list_(value, embed_dim))]
    meta = {f"lingcloud.{k}": str(v) for k, v in (metadata or {}).items()}
    if patch_shape is not None:
        t, d = patch_shape
        fields.append(pa.field("patch_tokens", pa.list_(value, t * d)))
        meta["lingcloud.patch_tokens_shape"] = f"{t},{d}"
    if text_embeddings:
        fields.append(pa.field(TEXT_EMBEDDING, pa.list_(value, embed_dim)))
    return FEATURES.with_metadata(pa.schema(fields), meta)


def patch_shape_of(schema: pa.Schema) -> Optional[tuple[int, int]]:
    """(T, D) of the patch_tokens column from schema metadata, or None when the table has none."""
    if "patch_tokens" not in schema.names:
        return None
    raw = (schema.metadata or {}).get(b"lingcloud.patch_tokens_shape")
    if raw is None:
        return None
    t, d = (int(x) for x in raw.decode().split(","))
    return t, d
