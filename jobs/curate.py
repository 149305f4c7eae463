"""`ray job submit --working-dir . -- python jobs/curate.py --config configs/<x>.yaml`"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the working dir

from lmeye.entry import job_main  # noqa: E402
from pipelines.curate import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(run, description=__doc__))
