"""Train-stage throughput: streaming the tables against the same steps over batches held in memory.

    python benchmarks/train.py [--rows 16384] [--workers 2] [--fake]

Builds an instructions table and a features table (``--rows`` image rows of the demo's kind), then,
in one command and on the same Ray:

1. *tables*: the train stage as shipped (``pipelines.train.run``): Ray Data streams the
   instructions shards to the workers, each batch's features are read by uid from the feature
   store, rows are tokenised and collated on the worker;
2. *memory*: the same worker, model, DeepSpeed config and batches, but every batch is read and
   collated before the clock starts, so only the steps are timed.

Both rates are rows trained per second of steps (the table run's first step, which also waits for
Ray Data's start-up, is left out and reported separately; Ray's start-up and validation never count). It
prints both and their ratio (target >= 0.9). ``--fake`` uses the test's fake IPN (a model so small
that the ratio measures the data path alone, a worst case); by default the real IPN of the demo
(``lmeye.model``, tiny LLaMA and CLIP features of the demo's width).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fake_module():
    spec = importlib.util.spec_from_file_location("_fake_ipn_file", REPO / "tests" / "lmeye" / "train" / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def in_memory_loop(config: dict) -> None:
    """The stage's worker, with every batch read and collated before the clock starts."""
    import ray.train

    from lmeye.train.loop import Worker

    w = Worker.start(config)
    shard = ray.train.get_dataset_shard("train")
    preps = [w.maker.prepare(t) for t in shard.iter_batches(batch_size=w.engine.micro, batch_format="pyarrow")]
    mine = [0.0] * w.world
    mine[w.rank] = float(len(preps))
    steps = int(min(w.comm.sum(mine)))  # the ranks step together: as many micro-steps as the shortest shard
    steps -= steps % w.engine.accum
    rows = 0
    t0 = time.time()
    for prep in preps[:steps]:
        rows += w.engine.micro_step(prep)[1]
    seconds = time.time() - t0
    total = w.comm.sum([float(rows)])[0]
    import tempfile

    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # Ray Train V2 keeps only the metrics of reports with a checkpoint
        ray.train.report({"rows": total, "seconds": seconds, "samples_per_s": total / seconds},
                         checkpoint=Checkpoint.from_directory(tmp))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)  # 2,048 rows were under 2 s of steps: start-up, not steady state
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--fake", action="store_true", help="the test's fake IPN instead of the real one")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()

    from lmeye.config import load_config
    from lmeye.runtime import init_ray
    from pipelines import train as stage

    work = Path(args.keep or tempfile.mkdtemp(prefix="lingcloud-bench-train-"))
    fake = _fake_module()
    if args.fake:
        tables = fake.build_tables(work, n_train=args.rows, n_val=8, missing=(), too_long=(), text_only=())
        factory = fake.FakeFactory()
        overrides_model = {}
    else:  # the real IPN (tiny demo LLaMA) on demo-width features
        tables = fake.build_tables(work, n_train=args.rows, n_val=8, missing=(), too_long=(), text_only=(), dim=32,
                                   patch=(16, 64))
        factory = None
        overrides_model = {"model.llm": None}
    overrides = {
        "data.root": str(work), "ray.num_cpus": 2, "train.instructions": str(tables["instructions"]),
        "train.features": str(tables["features"]), "train.output": str(work / "out"), "train.resume": "never",
        "train.num_workers": args.workers, "train.cpus_per_worker": 0.5, "train.zero_stage": 2,
        "train.precision": "fp32", "train.micro_batch_size": args.micro, "train.checkpoint_every": 10**6,
        "train.log_every": 10**6, "train.val_max_rows": 8, "train.shuffle_buffer": 0,
        "train.stages": [{"name": "bench", "trainable": "instruct", "train_visual_mapping": True}], **overrides_model,
    }
    cfg = load_config(None if args.fake else REPO / "configs" / "demo.yaml", overrides)
    if not args.fake:  # the demo's tiny LLM and CLIP (built once under the work folder)
        from lmeye.model.demo import ensure_demo_llm

        ensure_demo_llm(cfg)
    init_ray(cfg.ray)

    summary = stage.run(cfg, factory=factory)
    with open(work / "out" / "bench" / "summary.json") as f:
        metrics = json.load(f)["metrics"]
    # per-step rows / step time (the step's time includes pulling its batches); the first step also
    # waits for Ray Data's start-up, a one-off cost that the in-memory run pays before its clock
    with open(work / "out" / "bench" / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f][1:]
    table_rows = sum(r["rows"] for r in steps)
    table_seconds = sum(r["rows"] / r["samples_per_s"] for r in steps if r["rows"])
    table_rate = table_rows / table_seconds

    # the in-memory run: the same config, data and workers, another loop (the stage's own trainer)
    cfg, files, store, _, plan = stage.preflight(cfg, factory or stage.IPNFactory())
    st = plan[0][0]
    config, rows = stage.loop_config(cfg, st, factory or stage.IPNFactory(), files, store, None, str(work / "memory"))
    result = stage.fit(config, files, st, cfg.train, rows, str(work / "out"), name="memory", loop=in_memory_loop)
    captured = result.metrics
    memory_rate = captured["samples_per_s"]
    print(summary.render())
    print(f"tables: {table_rate:.1f} rows/s ({table_rows} rows in {table_seconds:.1f}s after the first step; "
          f"with Ray Data's start-up: {metrics['rows'] / metrics['train_seconds']:.1f} rows/s)")
    print(f"memory: {memory_rate:.1f} rows/s ({captured['rows']:.0f} rows in {captured['seconds']:.1f}s)")
    print(f"ratio tables/memory: {table_rate / memory_rate:.2f} (target >= 0.9)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
