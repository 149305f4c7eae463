"""Download stage vs a bare `img2dataset.download` call: same URL list, same settings, same Ray.

    .venv/bin/python benchmarks/download.py [--images 3000] [--repeats 2]

Both run against the loopback demo server (its own process) on one embedded Ray; runs
alternate (bare, stage, bare, stage, ...) after an untimed warm-up of each, so start-up costs and
drift hit both alike. Prints images/s of each
(median over repeats) and stage/bare. Target: >= 0.95.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = dict(image_size=64, resize_mode="border", thread_count=32, timeout=10, encode_format="jpg",
                encode_quality=95)


def bare(urls: Path, out: Path, samples_per_shard: int) -> None:
    from img2dataset import download

    download(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
             output_folder=str(out), output_format="parquet", distributor="ray",
             number_sample_per_shard=samples_per_shard, extract_exif=False, compute_hash="sha256",
             enable_wandb=False, **SETTINGS)


def stage(urls: Path, out: Path, samples_per_shard: int) -> None:
    from lmeye.config import load_config
    from pipelines.download import run

    cfg = load_config(None, {"download.input": str(urls), "download.output": str(out),
                             "download.samples_per_shard": samples_per_shard,
                             **{f"download.{k}": v for k, v in SETTINGS.items()}})
    summary = run(cfg)
    assert summary.ok, summary.render()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    args = ap.parse_args()

    from lmeye.demo.corpus import write_corpus, write_url_list
    from lmeye.demo.server import start_server_process
    from lmeye.runtime import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    corpus = write_corpus(work / "corpus", num_images=args.images, seed=0, image_size=96)
    server, base_url = start_server_process(corpus.root)
    try:
        urls = write_url_list(corpus, base_url, work / "urls.csv")
        n = args.images + len(corpus.broken)
        init_ray()
        # Warm-up (untimed): Ray's first tasks pay for worker start-up and imports.
        warm = write_url_list(corpus, base_url, work / "warm.csv")
        bare(warm, work / "warm-bare", args.samples_per_shard)
        stage(warm, work / "warm-stage", args.samples_per_shard)
        results: dict[str, list[float]] = {"bare img2dataset": [], "lingcloud stage": []}
        for r in range(args.repeats):
            for name, fn in (("bare img2dataset", bare), ("lingcloud stage", stage)):
                out = work / f"out-{name.split()[0]}-{r}"
                t0 = time.perf_counter()
                fn(urls, out, args.samples_per_shard)
                dt = time.perf_counter() - t0
                results[name].append(n / dt)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  run {r}: {name:17s} {n / dt:8.1f} URLs/s ({dt:.1f}s)", flush=True)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    b = statistics.median(results["bare img2dataset"])
    s = statistics.median(results["lingcloud stage"])
    print(f"{n} URLs, {args.samples_per_shard}/shard, median of {args.repeats}:")
    print(f"  bare img2dataset.download  {b:8.1f} URLs/s")
    print(f"  lingcloud download stage   {s:8.1f} URLs/s")
    print(f"  ratio stage/bare           {s / b:8.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
