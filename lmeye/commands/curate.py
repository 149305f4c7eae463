"""`lmeye curate [PAIRS] [CURATION] [--config FILE] [--set curate.k=v]`: keep/drop verdicts of a pairs table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.cli import add_stage_command

    add_stage_command(
        sub, "curate",
        help="score, deduplicate and decontaminate a pairs table into a curation table (keep, scores, reasons; Ray)",
        description="Decide for every row of a pairs table whether training keeps it: metadata filters (LAION safety "
        "and watermark columns, size, aspect ratio, caption length), the CLIP image-caption score (needs "
        "extract.text_embeddings: true), exact and near duplicates (perceptual hash and SemDeDup over the features "
        "table's embeddings) and copies of benchmark images (curate.benchmarks). Thresholds come from the curate: "
        "section; instruct.curation and train.curation then keep only the kept uids.",
        positionals=[("pairs", "curate.pairs", "pairs table (default: curate.pairs, else download.output)"),
                     ("curation", "curate.output", "curation table to write (default: {data.root}/curation)")],
    )
