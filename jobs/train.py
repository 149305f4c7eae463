"""`ray job submit --working-dir . -- python jobs/train.py --config configs/<x>.yaml [--set k=v]`:
train the IPN (DeepSpeed on Ray Train), stage after stage as the config's `train.stages` say."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmeye.entry import job_main  # noqa: E402
from pipelines.train import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(run, description=__doc__.split("\n")[0]))
