"""`python run_fake.py SPEC.json`: the train stage with the fake IPN, in its own process (for kill tests).

SPEC: {"overrides": {...config keys...}, "log_dir": str, "delay_s": float}. Prints the summary.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

if __name__ == "__main__":
    import importlib.util

    spec_file = json.loads(Path(sys.argv[1]).read_text())
    spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path(__file__).with_name("fake_ipn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake = module.load()

    from lmeye.config import load_config
    from pipelines.train import run

    cfg = load_config(None, spec_file["overrides"])
    summary = run(cfg, factory=fake.FakeFactory(log_dir=spec_file.get("log_dir"), delay_s=spec_file.get("delay_s", 0.0)))
    print(summary.render(), flush=True)
    sys.exit(0 if summary.ok else 1)
