"""`make demo` / `lmeye demo`: the whole pipeline, end to end, offline.

download -> extract -> instruct -> train (align, then instruct) -> evaluate: small MME-,
MMBench- and SEED-Bench-layout sets written from held-out demo images are scored with the
trained IPN (and SEED-Bench with stage 1 alone, for the static-versus-interactive comparison),
then a report folder (Markdown + PNG plots) and a one-screen summary are written.

The synthetic corpus is written to ``demo.corpus_dir`` and served on 127.0.0.1 so the real
download path (img2dataset over HTTP) is exercised; later stages then run on the tables it
produced. Every stage is resumable, so rerunning the demo redoes nothing that is finished
(uids come from URLs, so the corpus server listens on the fixed port ``demo.port``).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Callable

from lmeye.config import Config
from lmeye.demo.corpus import write_corpus, write_url_list
from lmeye.demo.server import DemoServer
from lmeye.report import StageSummary
from lmeye.runtime import init_ray
from lmeye.stages import run_recorded

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


def run_demo(cfg: Config, benchmarks: bool = True) -> list[StageSummary]:
    """The pipeline on the demo corpus; with ``benchmarks``, then the held-out benchmark sets and the report."""
    from pipelines.download import run as download

    d = cfg.demo
    corpus = write_corpus(d.corpus_dir, num_images=d.num_images, seed=d.seed, image_size=d.image_size, max_objects=d.max_objects)
    print(f"[demo] corpus: {len(corpus.items)} images + {len(corpus.broken)} broken entries in {d.corpus_dir}")
    init_ray(cfg.ray)
    summaries: list[StageSummary] = []
    started = time.time()
    with DemoServer(d.corpus_dir, port=d.port) as server:
        url_list = write_url_list(corpus, server.base_url, f"{d.corpus_dir}/{URL_FILE[d.url_format]}", fmt=d.url_format)
        print(f"[demo] serving on {server.base_url}; URL list {url_list}")
        cfg.download.input = str(url_list)
        cfg.download.input_format = d.url_format
        summaries.append(run_recorded(download, cfg))
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
        summaries.append(run_recorded(stage, cfg))
        print(summaries[-1].render(), flush=True)
    if benchmarks and summaries[-1].ok and summaries[-1].stage.startswith("train"):
        evaluate_demo(cfg, corpus.items, summaries, started)
    status = "ok" if all(s.ok for s in summaries) else "INCOMPLETE"
    print(f"[demo] {status}: {', '.join(s.stage for s in summaries)} in {time.time() - started:.1f}s; "
          f"tables under {cfg.data.root}")
    return summaries


def evaluate_demo(cfg: Config, training_items: list, summaries: list[StageSummary], started: float) -> Path:
    """Score the trained IPN on benchmark-layout sets of held-out images; write the report."""
    from lmeye.demo.benchsets import accuracy_by_type, heldout_items, write_benchsets
    from lmeye.demo.report import ReportInputs, final_summary, write_report
    from lmeye.eval.ipn_answerer import build_answerer
    from lmeye.eval.run import evaluate, evaluate_all
    from pipelines.train import _paths, stage_dir

    d, root = cfg.demo, Path(cfg.data.root)
    items = heldout_items(d.eval_images, d.seed, exclude=training_items)
    sets = write_benchsets(root / "benchsets", items, d.image_size, d.seed)
    output = _paths(cfg)[2]
    names = [s.name for s in cfg.train.stages]
    final = build_answerer(f"{stage_dir(output, names[-1])}/model", max_new_tokens=d.eval_max_new_tokens)
    scores = evaluate_all(final, dataclasses.asdict(sets), root / "eval", batch_size=d.eval_batch_size)
    accuracy = {f"stage {names[-1]}": accuracy_by_type(scores["seedbench"])}
    if len(names) > 1:  # stage 1 alone on the same questions: LMEye's static-versus-interactive claim
        first = build_answerer(f"{stage_dir(output, names[0])}/model", max_new_tokens=d.eval_max_new_tokens)
        alone = evaluate("seedbench", first, sets.seedbench, root / "eval" / names[0], batch_size=d.eval_batch_size)
        accuracy = {f"stage {names[0]} alone": accuracy_by_type(alone), f"stages {' + '.join(names)}": accuracy[f"stage {names[-1]}"]}
        checks = {"SEED-Bench (held-out)": f"stage {names[0]} alone {alone['overall']:.3f}, "
                                           f"after stage {names[-1]} {scores['seedbench']['overall']:.3f}"}
    else:
        checks = {}
    inputs = ReportInputs(
        metrics={n: f"{stage_dir(output, n)}/metrics.jsonl" for n in names}, summaries=summaries,
        accuracy=accuracy, scores=scores, checks=checks, wall_seconds=time.time() - started,
    )
    report = write_report(root / "report", inputs)
    print(final_summary(inputs, report), flush=True)
    return report
