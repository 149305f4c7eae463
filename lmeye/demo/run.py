"""`make demo` / `lmeye demo`: the whole pipeline, end to end, offline.

download -> extract -> curate -> instruct -> train (align, then instruct) -> evaluate: small MME-,
MMBench- and SEED-Bench-layout sets written from held-out demo images are scored with the
trained IPN (and SEED-Bench with stage 1 alone, for the static-versus-interactive comparison),
then a report folder (Markdown + PNG plots) and a one-screen summary are written.

The corpus carries planted cases (``demo.planted``: duplicates, mismatched captions, copies of the
held-out benchmark images; ``lmeye.demo.planted``). The curate stage runs against the benchmark sets,
which are therefore written first; instruct and train use the rows it keeps, and the report scores
each filter against the planted truth.

The synthetic corpus is written to ``demo.corpus_dir`` and served on 127.0.0.1 so the real
download path (img2dataset over HTTP) is exercised; later stages then run on the tables it
produced. Every stage is resumable, so rerunning the demo redoes nothing that is finished
(uids come from URLs, so the corpus server listens on the fixed port ``demo.port``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import time
from pathlib import Path
from typing import Callable

from lmeye.config import Config
from lmeye.demo.console import Console
from lmeye.demo.corpus import write_corpus, write_url_list
from lmeye.demo.server import DemoServer
from lmeye.report import StageSummary
from lmeye.runtime import init_ray
from lmeye.stages import run_recorded
from schemas.curation import CLIP_SCORE

LOG_FILE = "logs/demo.log"  # under data.root: the run's folder
LEARNING_CHECK_FILE = "eval/learning_check.json"  # under data.root: the learning check's scores of both stages
CURATION_CHECK_FILE = "eval/curation_check.json"  # under data.root: each curate filter against the planted truth
URL_FILE = {"csv": "urls.csv", "tsv": "urls.tsv", "jsonl": "urls.jsonl", "parquet": "urls.parquet"}


def _optional_stages() -> list[tuple[str, Callable[[Config], StageSummary]]]:
    """Stages after download, in order; each joins the demo once its module exists."""
    stages = []
    for name in ("extract", "curate", "instruct", "train"):
        try:
            module = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pipelines.{name}":
                continue
            raise
        stages.append((name, module.run))
    return stages


def run_demo(cfg: Config, benchmarks: bool = True, verbose: bool = False, stop_ray: bool = False) -> list[StageSummary]:
    """The pipeline on the demo corpus; with ``benchmarks``, then the held-out benchmark sets and the report.

    The console shows a progress line per stage and the summaries; everything else (Ray's workers and
    libraries, the stages' own lines) goes to ``{data.root}/logs/demo.log``, unless ``verbose``.
    ``stop_ray`` (the command): the embedded Ray this process started is shut down before the console
    is given back, so late worker lines still go to the log."""
    from lmeye.demo.console import quiet_console
    from lmeye.runtime import embedded

    with quiet_console(Path(cfg.data.root) / LOG_FILE, quiet=not verbose) as console:
        try:
            return _run(cfg, benchmarks, console)
        finally:
            if stop_ray and embedded():
                import ray

                ray.shutdown()


def _run(cfg: Config, benchmarks: bool, console: Console) -> list[StageSummary]:
    from lmeye.demo.benchsets import heldout_items, write_benchsets
    from lmeye.demo.planted import plant
    from lmeye.model.demo import start_demo_llm
    from pipelines.download import run as download

    d = cfg.demo
    # the demo LLM trains behind the corpus, Ray's start, download and extract (lmeye.demo.behind); the CLIP's
    # heads (about 20 s) are aligned in line: behind as well, they slowed the download 3x and held the LLM up
    llm = start_demo_llm(cfg)
    corpus = write_corpus(d.corpus_dir, num_images=d.num_images, seed=d.seed, image_size=d.image_size, max_objects=d.max_objects)
    heldout = heldout_items(d.eval_images, d.seed, exclude=corpus.items, max_objects=d.max_objects)
    sets = write_benchsets(Path(cfg.data.root) / "benchsets", heldout, d.image_size, d.seed)
    planted = plant(corpus, heldout, d.planted, d.image_size, d.seed)
    console.say(f"[demo] corpus: {len(corpus.items)} images + {len(planted)} planted + {len(corpus.broken)} broken entries "
                f"in {d.corpus_dir}")
    _curate_with_benchsets(cfg, sets)
    init_ray(cfg.ray)
    summaries: list[StageSummary] = []
    started = time.time()
    with DemoServer(d.corpus_dir, port=d.port) as server:
        url_list = write_url_list(corpus, server.base_url, f"{d.corpus_dir}/{URL_FILE[d.url_format]}", fmt=d.url_format,
                                  extra=[(p.name, p.caption) for p in planted])
        print(f"[demo] serving on {server.base_url}; URL list {url_list}")
        cfg.download.input = str(url_list)
        cfg.download.input_format = d.url_format
        with console.stage("download"):
            summaries.append(run_recorded(download, cfg))
        console.say(summaries[-1].render())
    for name, stage in _optional_stages():
        if not summaries[-1].ok:
            break
        if name == "train":
            summaries += _train_each(cfg, stage, console, llm)
            continue
        with console.stage(name):
            if name == "extract":
                from lmeye.demo.clip_heads import ensure_demo_clip

                ensure_demo_clip(cfg)
            summaries.append(run_recorded(stage, cfg))
        console.say(summaries[-1].render())
    if benchmarks and summaries[-1].ok and summaries[-1].stage.startswith("train"):
        with console.stage("evaluate"):
            summary = evaluate_demo(cfg, heldout, sets, summaries, started)
        console.say(summary)
    status = "ok" if all(s.ok for s in summaries) else "INCOMPLETE"
    console.say(f"[demo] {status}: {', '.join(s.stage for s in summaries)} in {time.time() - started:.1f}s; "
                f"tables under {cfg.data.root}")
    return summaries


def _curate_with_benchsets(cfg: Config, sets) -> None:
    """Decontaminate against the demo's own benchmark sets, and let instruct and train use the rows kept."""
    if not cfg.curate.benchmarks:
        cfg.curate.benchmarks = [str(sets.mme), str(sets.mmbench), str(sets.seedbench)]
    cfg.instruct.curation = cfg.instruct.curation or cfg.curate.output
    cfg.train.curation = cfg.train.curation or cfg.curate.output


def _train_each(cfg: Config, stage: Callable[[Config], StageSummary], console: Console, llm=None) -> list[StageSummary]:
    """The train stage once per training stage (``train.only``), so each has its own progress line,
    summary and time (the report's stage table has a row for each)."""
    from lmeye.model.demo import ensure_demo_llm

    with console.stage("demo LLM"):  # the tiny LLM the IPN wraps, built once (``llm``: being built since the start)
        ensure_demo_llm(cfg, pending=llm)
    only, out = cfg.train.only, []
    try:
        for s in cfg.train.stages:
            if only is not None and s.name not in only:
                continue
            cfg.train.only = [s.name]
            with console.stage(f"train {s.name}"):
                out.append(run_recorded(stage, cfg))
            console.say(out[-1].render())
            if not out[-1].ok:
                break
    finally:
        cfg.train.only = only
    return out


def evaluate_demo(cfg: Config, items: list, sets, summaries: list[StageSummary], started: float) -> str:
    """Score the trained IPN on the benchmark-layout ``sets`` of the held-out ``items``; score the curate
    stage against the planted truth; write the report; return the one-screen summary."""
    from lmeye.demo.benchsets import accuracy_by_type
    from lmeye.demo.report import ReportInputs, final_summary, write_report
    from lmeye.eval.ipn_answerer import build_answerer
    from lmeye.eval.run import evaluate_all
    from pipelines.train import stage_dir, train_paths

    d, root = cfg.demo, Path(cfg.data.root)
    output = train_paths(cfg)[2]
    names = [s.name for s in cfg.train.stages]
    final = build_answerer(f"{stage_dir(output, names[-1])}/model", max_new_tokens=d.eval_max_new_tokens)
    scores = evaluate_all(final, dataclasses.asdict(sets), root / "eval", batch_size=d.eval_batch_size)
    accuracy, checks, baseline = {f"stage {names[-1]}": accuracy_by_type(scores["seedbench"])}, {}, {}
    if len(names) > 1:  # stage 1 alone on the same questions: LMEye's static-versus-interactive claim
        first = build_answerer(f"{stage_dir(output, names[0])}/model", max_new_tokens=d.eval_max_new_tokens)
        baseline = evaluate_all(first, dataclasses.asdict(sets), root / "eval" / names[0], batch_size=d.eval_batch_size)
        accuracy, line = learning_check_accuracy(cfg, names)
        checks["learning check"] = line
    curation = curation_scores(cfg) if any(s.stage == "curate" for s in summaries) else []
    clip_off = cfg.curate.min_clip_score is None and cfg.curate.clip_score_top_fraction is None
    if curation:
        from lmeye.demo.curation_check import summary_line

        checks["curation vs planted"] = summary_line(curation, off=(CLIP_SCORE,) if clip_off else ())
    inputs = ReportInputs(
        metrics={n: f"{stage_dir(output, n)}/metrics.jsonl" for n in names}, summaries=summaries,
        accuracy=accuracy, scores=scores, checks=checks, wall_seconds=time.time() - started,
        gallery=gallery(final, items, d.image_size), baseline=baseline, baseline_name=f"stage {names[0]} alone",
        curation=curation, curation_note=CURATION_NOTE if clip_off else "",
    )
    report = write_report(root / "report", inputs)
    return final_summary(inputs, report)


# When a config leaves the CLIP-score filter off (configs/demo.yaml turns it on), its mismatched captions are planted all the same.
CURATION_NOTE = ("clip_score is off in this run (curate.min_clip_score and curate.clip_score_top_fraction are unset), so the "
                 "planted mismatched captions stay in; configs/demo.yaml sets a floor on the head-aligned demo CLIP's score")


def curation_scores(cfg: Config) -> list:
    """The curate stage's filters scored against ``{demo.corpus_dir}/planted.json`` (``lmeye.demo.curation_check``),
    also written to ``{data.root}/eval/curation_check.json``."""
    from lmeye.demo.curation_check import read_and_score
    from lmeye.demo.planted import load_planted

    scores = read_and_score(cfg.curate.output, cfg.curate.pairs, load_planted(cfg.demo.corpus_dir))
    path = Path(cfg.data.root) / CURATION_CHECK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s.filter: dataclasses.asdict(s) for s in scores}, indent=1) + "\n")
    return scores


def learning_check_accuracy(cfg: Config, names: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """Exact match per question type on the corpus's held-out questions (the learning check): stage 1
    alone, stage 1 + 2, and the two controls of the final model (the most common training answer of
    the type; each question paired with another image's features). And its one-line summary. The
    scores are also written to ``{data.root}/eval/learning_check.json``."""
    from lmeye.demo.learning_check import score

    results = score(cfg)
    # kept for whoever checks the thresholds (tests/test_demo.py), so the scoring runs once
    path = Path(cfg.data.root) / LEARNING_CHECK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    first, final = results[names[0]], results[names[-1]]
    accuracy = {
        f"stage {names[0]} alone": first["exact_match"],
        f"stages {' + '.join(names)}": final["exact_match"],
        "control: most common answer": final["majority"],
        "control: another image's features": final["swapped"],
    }
    worst = min((v, t) for t, v in final["exact_match"].items() if t != "all")
    line = (f"{final['rows']} held-out questions: exact match {final['exact_match']['all']:.3f} (worst type {worst[1]} "
            f"{worst[0]:.3f}; stage {names[0]} alone {first['exact_match']['all']:.3f}); most common answer "
            f"{final['majority']['all']:.3f}; another image's features {final['swapped']['all']:.3f}")
    return accuracy, line


def gallery(answerer, items: list, image_size: int, count: int = 8) -> list:
    """The first ``count`` held-out images, each with one question (the types in turn) and the model's answer."""
    from lmeye.demo.benchsets import multiple_choice
    from lmeye.demo.corpus import render
    from lmeye.demo.report import GalleryEntry
    from lmeye.eval.common import open_image
    from lmeye.train.evaluate import normalise

    rng = random.Random(0)
    chosen = []
    for i, item in enumerate(items[:count]):
        questions = multiple_choice(item, rng)
        chosen.append((item, questions[i % len(questions)]))
    images = [render(item, image_size) for item, _ in chosen]
    answers = answerer.answer([open_image(b, item.name) for b, (item, _) in zip(images, chosen)], [q.question for _, q in chosen])
    return [GalleryEntry(b, q.question, a.strip(), q.answer, normalise(a) == normalise(q.answer))
            for b, (_, q), a in zip(images, chosen, answers)]
