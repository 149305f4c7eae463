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
