"""The instruct stage: LMEyeMID-style instruction data -> the `instructions` table.

The public interface (what `lmeye instruct`, `jobs/instruct.py`, the demo and the tests use):

* ``run(cfg) -> StageSummary``: build the table (``stage``);
* ``split_files(path)``, ``export_hf(path, out_dir)``: the table for Hugging Face (``export``);
* ``Placement``: where a uid goes, partition and split (``partition``).

Inside the package each module talks to the others through their public names only:
``inputs`` (paths, input tables) -> ``jsonio``/``records`` (files -> parsed records) ->
``images`` (image reference -> uid) / ``captions`` (caption tasks) -> ``rows`` (accounting,
spilled rows) -> ``partition`` (placement, spill files) -> ``stage`` (per-partition work, the
table) -> ``export``.
"""

from pipelines.instruct.export import export_hf, split_files
from pipelines.instruct.partition import Placement
from pipelines.instruct.stage import run

__all__ = ["run", "export_hf", "split_files", "Placement"]
