"""`lmeye train [--config FILE] [--set k=v]`: train the IPN, stage after stage (DeepSpeed on Ray Train)."""

from __future__ import annotations

import argparse

from lmeye.cli import add_stage_command


def register(sub: argparse._SubParsersAction) -> None:
    add_stage_command(
        sub, "train", help="train the IPN with DeepSpeed on Ray Train (train.stages, e.g. align then instruct)",
        positionals=[],
        description="Train the IPN stage after stage on Ray Train workers running DeepSpeed, streaming the "
        "instructions table and reading features by uid. `--set train.only=[align]` runs one stage; "
        "`--set train.resume=latest` (the default) continues a killed run from its last checkpoint.",
    )
