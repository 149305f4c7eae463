"""Data files shipped with the package: the caption templates of the instruct stage."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTIONS = HERE / "captions.yaml"
