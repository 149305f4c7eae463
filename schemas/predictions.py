"""`predictions`: a trained IPN's answers to the questions of an instructions-style table.

One row per input row that was asked (the configured split, or every row), in shards named like
the input shards they came from. ``prompt`` is the last user turn (earlier turns of a multi-turn
conversation are the context it was asked in); ``reference`` is the conversation's final
assistant turn when it has one (null otherwise). A row that could not be asked is kept with its
``status`` (``missing_features``: its uid is not in the feature store; ``too_long``: the prompt
does not fit the model's max_length) and a null ``answer``: failures are data.
"""

import pyarrow as pa

from schemas import TableSchema

SUCCESS = "success"
MISSING_FEATURES = "missing_features"
TOO_LONG = "too_long"

PREDICTIONS = TableSchema(
    name="predictions",
    version=1,
    schema=pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),  # the input row's sample_id
            pa.field("uid", pa.string()),  # the image; null for a text-only question
            pa.field("task", pa.string()),  # the input row's task, e.g. vqa (for per-task scores)
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("answer", pa.string()),
            pa.field("reference", pa.string()),
            pa.field("status", pa.string(), nullable=False),
        ]
    ),
)
