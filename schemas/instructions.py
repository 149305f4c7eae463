"""`instructions`: LMEyeMID-style instruction-following rows, joined to images by `uid`.

One row is one training sample: an image (by uid) and a whole conversation about it, LLaVA
style. A single question/answer is one pair of turns; a multi-turn LLaVA conversation stays one
row. Roles are normalised to ``user`` / ``assistant`` (LLaVA's ``human`` / ``gpt`` are mapped),
the first turn is the user's, turns alternate and the last one is the assistant's.

The image never appears in the text: the ``<image>`` placeholder of LLaVA-style data is
stripped, because the image enters through the IPN (its ``<img>`` prompt embeddings precede the
conversation), not through a token in the prompt.

The table is written as ``train-PPPPP-of-NNNNN.parquet`` and ``validation-PPPPP-of-NNNNN.parquet``
shards (the file names Hugging Face ``datasets`` maps to splits), and every row also carries its
``split``. The split is by image: every row of one uid is on the same side.
"""

import pyarrow as pa

from schemas import UID128_NOTE, TableSchema

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
ROLES = (ROLE_USER, ROLE_ASSISTANT)

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)

TURN = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
CONVERSATION = pa.list_(pa.field("item", TURN))

INSTRUCTIONS = TableSchema(
    name="instructions",
    version=2,  # 2: 128-bit uids
    migrations={1: UID128_NOTE},
    schema=pa.schema(
        [
            # 16 hex chars: hash of source + uid + conversation, so it is stable across reruns,
            # resharding and reshuffling, and unique within the table (exact duplicates are removed).
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("uid", pa.string(), nullable=False),  # the image (lmeye.uid), joins pairs/features
            pa.field("source", pa.string(), nullable=False),  # the configured source name
            pa.field("task", pa.string(), nullable=False),  # e.g. short_caption, vqa, conversation
            pa.field("split", pa.string(), nullable=False),  # train | validation
            pa.field("conversation", CONVERSATION, nullable=False),
        ]
    ),
)


def shard_name(split: str, partition: int, partitions: int) -> str:
    """``train-00003-of-00016.parquet``: HF ``datasets`` infers the split from this name."""
    return f"{split}-{partition:05d}-of-{partitions:05d}.parquet"
