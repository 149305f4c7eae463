"""The images of the benchmarks `lmeye eval` reads, as perceptual hashes, for decontamination.

A path is recognised by the same layouts the readers in ``lmeye.eval`` accept: an MMBench TSV
(base64 images), a SEED-Bench JSON or a folder holding ``SEED-Bench.json``, or an MME root
(``<root>/<subtask>/...``). Anything else is one error naming the path. The hashes are small
(8 bytes per benchmark image), so every scoring task gets them all.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator

import numpy as np

from lmeye.eval.common import LayoutError
from pipelines.curate.scores import hash_ints, phash_hex


def _mme(path: Path) -> Iterator[tuple[str, bytes]]:
    from lmeye.eval.mme import read_mme

    seen = set()
    for q in read_mme(path):
        if q.image_path not in seen:
            seen.add(q.image_path)
            yield f"mme:{q.subtask}/{q.image}", q.image_path.read_bytes()


def _mmbench(path: Path) -> Iterator[tuple[str, bytes]]:
    from lmeye.eval.mmbench import read_mmbench

    for q in read_mmbench(path):
        yield f"mmbench:{q.index}", base64.b64decode(q.image)


def _seedbench(path: Path) -> Iterator[tuple[str, bytes]]:
    from lmeye.eval.seedbench import read_seedbench

    seen = set()
    for q in read_seedbench(path).questions:
        if q.image_path not in seen:
            seen.add(q.image_path)
            yield f"seedbench:{q.image_path.name}", q.image_path.read_bytes()


def layout_of(path: str | Path):
    """The reader for ``path``'s layout; one LayoutError naming the path when it is none of the three."""
    from lmeye.eval.mme import SUBTASKS
    from lmeye.eval.seedbench import DEFAULT_JSON

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".tsv":
        return _mmbench
    if (p.is_file() and p.suffix.lower() == ".json") or (p.is_dir() and (p / DEFAULT_JSON).is_file()):
        return _seedbench
    if p.is_dir() and any((p / s).is_dir() for s in SUBTASKS):
        return _mme
    raise LayoutError(
        f"{path}: not a benchmark in a layout `lmeye eval` reads (an MME root with <subtask>/ folders, "
        f"an MMBench .tsv, or a SEED-Bench .json or a folder holding {DEFAULT_JSON})"
    )


def benchmark_images(paths: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """(path, label, encoded image) of every image of every benchmark; every layout is checked first."""
    readers = [(path, layout_of(path)) for path in paths]  # a bad path fails before any image is read
    for path, reader in readers:
        for label, data in reader(Path(path)):
            yield path, label, data


def benchmark_hashes(paths: list[str]) -> tuple[list[str], np.ndarray]:
    """(labels, uint64 phashes) of every image of every benchmark."""
    labels, hexes = [], []
    for path, label, data in benchmark_images(paths):
        h = phash_hex(data)
        if h is None:
            raise LayoutError(f"{path}: {label}: the image cannot be decoded")
        labels.append(label)
        hexes.append(h)
    return labels, hash_ints(hexes)


def benchmark_embeddings(paths: list[str], features: str, batch: int = 64) -> np.ndarray:
    """Unit CLIP image embeddings (float32) of every benchmark image, in ``benchmark_hashes`` order,
    from the model that wrote the ``features`` table (``lmeye.serve.encoder``: its own code path)."""
    from lmeye.serve.encoder import ImageEncoder
    from pipelines.curate.semdedup import normalise

    encoder = ImageEncoder(features)
    out, pending = [], []
    for _, _, data in benchmark_images(paths):
        pending.append(data)
        if len(pending) == batch:
            out.append(encoder.encode(pending)[0])
            pending = []
    if pending:
        out.append(encoder.encode(pending)[0])
    return normalise(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)
