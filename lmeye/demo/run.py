"""`make demo` / `lmeye demo`: the whole pipeline, end to end, offline.

The synthetic corpus is written to ``demo.corpus_dir`` and served on 127.0.0.1 so the real
download path (img2dataset over HTTP) is exercised; later stages then run on the tables it
produced. Every stage is resumable, so rerunning the demo redoes nothing that is finished
(uids come from URLs, so the corpus server listens on the fixed port ``demo.port``).
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

from lmeye.config import Config
from lmeye.demo.corpus import write_corpus, write_url_list
from lmeye.demo.server import DemoServer
from lmeye.report import StageSummary
from lmeye.runtime import init_ray

URL_FILE = {"csv": "urls.csv", "tsv": "urls.tsv", "jsonl": "urls.jsonl", "parquet": "urls.parquet"}


def _optional_stages() -> list[tuple[str, Callable[[Config], StageSummary]]]:
    """Stages after download, in order; each joins the demo once its module exists."""
    stages = []
    for name in ("extract", "instruct", "train"):
        try:
            module = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pipelines.{name}":
                continue
            raise
        stages.append((name, module.run))
    return stages


def run_demo(cfg: Config) -> list[StageSummary]:
    from pipelines.download import run as download

    d = cfg.demo
    corpus = write_corpus(d.corpus_dir, num_images=d.num_images, seed=d.seed, image_size=d.image_size)
    print(f"[demo] corpus: {len(corpus.items)} images + {len(corpus.broken)} broken entries in {d.corpus_dir}")
    init_ray(cfg.ray)
    summaries: list[StageSummary] = []
    started = time.time()
    with DemoServer(d.corpus_dir, port=d.port) as server:
        url_list = write_url_list(corpus, server.base_url, f"{d.corpus_dir}/{URL_FILE[d.url_format]}", fmt=d.url_format)
        print(f"[demo] serving on {server.base_url}; URL list {url_list}")
        cfg.download.input = str(url_list)
        cfg.download.input_format = d.url_format
        summaries.append(download(cfg))
        print(summaries[-1].render(), flush=True)
    for name, stage in _optional_stages():
        if not summaries[-1].ok:
            break
        if name == "extract":
            from lmeye.clip import ensure_demo_model

            ensure_demo_model(cfg.extract)
        if name == "train":  # the tiny LLM the IPN wraps, built once
            from lmeye.model.demo import ensure_demo_llm

            ensure_demo_llm(cfg)
        summaries.append(stage(cfg))
        print(summaries[-1].render(), flush=True)
    status = "ok" if all(s.ok for s in summaries) else "INCOMPLETE"
    print(f"[demo] {status}: {', '.join(s.stage for s in summaries)} in {time.time() - started:.1f}s; "
          f"tables under {cfg.data.root}")
    return summaries
