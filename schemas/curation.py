"""`curation`: the curate stage's verdict on every `pairs` row, by uid.

One row per pairs row (failed downloads included), in shards named like the pairs shards
they came from. ``keep`` is true when no filter dropped the row; ``reasons`` lists every filter
that did (a row can fail several), with the reason names below. The scores are what the
filters looked at, null when not computed (no image, no caption embedding, column absent):

* ``clip_score``: cosine of the CLIP image and caption embeddings (features table);
* ``punsafe`` / ``pwatermark``: LAION's safety and watermark probabilities, copied from the pairs
  table when it has those columns;
* ``phash``: the image's 64-bit perceptual hash (imagehash.phash), 16 hex characters;
* ``duplicate_of``: the uid kept in this row's duplicate group (null: not a duplicate);
* ``contaminated_by``: the benchmark image this row matches ("<benchmark>:<file or id>").

The thresholds behind the verdicts are in the manifest's ``config`` (``lmeye lineage`` shows them).
"""

import pyarrow as pa

from schemas import TableSchema

# reasons (the values of the `reasons` list)
NOT_DOWNLOADED = "not_downloaded"
NO_FEATURES = "no_features"
UNSAFE = "unsafe"
WATERMARK = "watermark"
TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
CAPTION_LENGTH = "caption_length"
CLIP_SCORE = "clip_score"
DUPLICATE = "duplicate"
CONTAMINATED = "contaminated"

CURATION = TableSchema(
    name="curation",
    version=1,
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("keep", pa.bool_(), nullable=False),
            pa.field("reasons", pa.list_(pa.string()), nullable=False),
            pa.field("clip_score", pa.float32()),
            pa.field("punsafe", pa.float32()),
            pa.field("pwatermark", pa.float32()),
            pa.field("width", pa.int32()),  # original size (the pairs table's original_width/height)
            pa.field("height", pa.int32()),
            pa.field("caption_words", pa.int32()),
            pa.field("phash", pa.string()),
            pa.field("duplicate_of", pa.string()),
            pa.field("contaminated_by", pa.string()),
        ]
    ),
)
