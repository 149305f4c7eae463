"""`pairs`: what the download stage produced for every input URL, failures included."""

import pyarrow as pa

from schemas import UID128_NOTE, TableSchema

# Status values are img2dataset's own, so its documentation applies unchanged.
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
# Column names other code reads by (features has uid and status under the same names).
UID, URL, CAPTION, STATUS = "uid", "url", "caption", "status"

PAIRS = TableSchema(
    name="pairs",
    version=2,  # 2: 128-bit uids
    migrations={1: UID128_NOTE},
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),  # 32 hex chars (128 bits) from the URL alone (lmeye.uid)
            pa.field("url", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            pa.field("width", pa.int32()),  # after resizing
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("sha256", pa.string()),  # of the downloaded (original) bytes
            pa.field("image", pa.binary()),  # encoded image; null for failed rows
        ]
    ),
)

# Columns of the URL list kept in pairs (``download.additional_columns``: LAION's NSFW or
# punsafe, pwatermark, similarity, LICENSE, WIDTH, HEIGHT...) follow the columns above, in the
# configured order. Their names may not be the pairs columns' nor img2dataset's own output
# columns', which share its raw shards with them.
IMG2DATASET_COLUMNS = ("key", "exif", "error_message", "status", "width", "height", "original_width",
                       "original_height", "sha256", "jpg", "png", "webp")
RESERVED_COLUMNS = frozenset(PAIRS.columns) | frozenset(IMG2DATASET_COLUMNS)


def additional_type(t: pa.DataType) -> pa.DataType:
    """The stored type of an additional column read as ``t``: whole numbers int64, other numbers
    float64, booleans bool, anything else its text (one type whatever each input file says)."""
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pa.float64()
    if pa.types.is_boolean(t):
        return pa.bool_()
    return pa.string()


def with_additional(extra: pa.Schema) -> pa.Schema:
    """The pairs schema of a table that keeps the additional columns ``extra``."""
    return PAIRS.with_metadata(pa.schema(list(PAIRS.schema) + list(extra)))
