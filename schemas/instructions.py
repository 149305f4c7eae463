"""`instructions`: LMEyeMID-style instruction-following rows, joined to images by `uid`.

One row is one training sample: an image (by uid) and a whole conversation about it, LLaVA
style. A text-only record (LLaVA mixes hold tens of thousands; LLaVA trains on them) is a row
with a null ``uid``. A single question/answer is one pair of turns; a multi-turn LLaVA conversation stays one
row. Roles are normalised to ``user`` / ``assistant`` (LLaVA's ``human`` / ``gpt`` are mapped),
the first turn is the user's, turns alternate and the last one is the assistant's.

The image never appears in the text: the ``<image>`` placeholder of LLaVA-style data is
stripped, because the image enters through the IPN (its ``<img>`` prompt embeddings precede the
conversation), not through a token in the prompt.

The table is written as ``train-PPPPP-of-NNNNN.parquet`` and ``validation-PPPPP-of-NNNNN.parquet``
shards (the file names Hugging Face ``datasets`` maps to splits), and every row also carries its
``split``. The split is by image: every row of one uid is on the same side. A shard is never
empty: a partition without validation rows has no validation shard, so a small corpus has no
validation split at all rather than a 0-row one.

Version 2 (was 1): ``uid`` may be null (text-only records) and ``source_id`` is new.
"""

import pyarrow as pa

from schemas import UID128_NOTE, TableSchema

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
ROLES = (ROLE_USER, ROLE_ASSISTANT)

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)

# Column names: stages and tests name columns through these, never as string literals.
SAMPLE_ID, UID, SOURCE, TASK, SPLIT, CONVERSATION_COL, SOURCE_ID = (
    "sample_id", "uid", "source", "task", "split", "conversation", "source_id")

TURN = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
CONVERSATION = pa.list_(pa.field("item", TURN))

INSTRUCTIONS = TableSchema(
    name="instructions",
    version=2,  # 2: 128-bit uids
    migrations={1: UID128_NOTE},
    schema=pa.schema(
        [
            # 16 hex chars: hash of source + uid + conversation (+ the record's position in its
            # file), so it is stable across reruns and reshuffling, and unique within the table
            # even when exact duplicates are kept (dedupe: false).
            pa.field(SAMPLE_ID, pa.string(), nullable=False),
            pa.field(UID, pa.string()),  # the image (lmeye.uid), joins pairs/features; null: text-only
            pa.field(SOURCE, pa.string(), nullable=False),  # the configured source name
            pa.field(TASK, pa.string(), nullable=False),  # e.g. short_caption, vqa, conversation
            pa.field(SPLIT, pa.string(), nullable=False),  # train | validation
            pa.field(CONVERSATION_COL, CONVERSATION, nullable=False),
            # the record's own id in its source file (LLaVA's ``id``, the configured id_field),
            # else ``<file>:<record N | line N>``; null for captions of a pairs table (uid says it)
            pa.field(SOURCE_ID, pa.string()),
        ]
    ),
)


def shard_name(split: str, partition: int, partitions: int) -> str:
    """``train-00003-of-00016.parquet``: HF ``datasets`` infers the split from this name."""
    return f"{split}-{partition:05d}-of-{partitions:05d}.parquet"
