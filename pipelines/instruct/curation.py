"""The curation keep-list (``instruct.curation``): rows whose image the curation table does not
keep are left out, counted as ``curated_out``.

Scale: like the features check, the kept uids are spilled into the same P partitions as the rows
(``spill_kept``), so each partition checks its rows against its own share of the keep-list and
no structure grows with the table on the driver.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config.instruct import InstructConfig
from lmeye.errors import UserError
from lmeye.stages import version_of
from lmeye.spill import Spill
from lmeye.tables import Manifest, TableReader
from pipelines.instruct.inputs import InputTables
from pipelines.instruct.partition import FEAT_SCHEMA, Placement, uid_keys
from schemas.curation import CURATION
from schemas.pairs import UID

OUTCOME = "curated_out"


def curation_table(ic: InstructConfig, inputs: InputTables) -> Optional[TableReader]:
    if ic.curation is None:
        return None
    return inputs.open(ic.curation, "instruct.curation", CURATION, "run `lmeye curate` first, or unset instruct.curation")


def spill_kept(curation: TableReader, spill: Spill, placement: Placement) -> int:
    """Spill the uids the curation table keeps; returns how many."""
    kept = 0
    for batch in curation.iter_batches(columns=[UID, "keep"], batch_size=262144):
        uids = pc.filter(batch.column(0), batch.column(1))
        kept += len(uids)
        if len(uids):
            part, _ = placement.place(uid_keys(uids)[0])
            spill.write(pa.Table.from_arrays([uids], schema=FEAT_SCHEMA), part)
    return kept


def kept_mask(uids: pa.ChunkedArray, kept: pa.Table) -> np.ndarray:
    """Which rows stay: their uid is kept, or they have no image (text-only rows need no curation)."""
    mask = pc.is_in(uids, value_set=kept[UID].combine_chunks()).to_numpy(zero_copy_only=False)
    return mask | pc.is_null(uids).to_numpy(zero_copy_only=False)


def recorded(ic: InstructConfig) -> dict[str, str]:
    """What the instructions manifest says about its curation: the table and its version when read."""
    return {"table": ic.curation, "version": version_of(ic.curation)} if ic.curation else {}


def check_built_with(instructions: str, curation: str) -> None:
    """``train.curation``: the instructions table must have been built with this curation table, as it
    is now (instruct applies the keep-list at scale, partition by partition); one error otherwise."""
    manifest = Manifest.load(instructions)
    got = (manifest.stats.get("curation") or {}) if manifest is not None else {}
    same_table = bool(got.get("table")) and _norm(got["table"]) == _norm(curation)
    if not same_table or got.get("version") != version_of(curation):
        built = f"with {got['table']} (version {got.get('version')})" if got.get("table") else "without instruct.curation"
        raise UserError(
            f"train.curation {curation}: the instructions table {instructions} was built {built}, not with this curation "
            f"table as it is now (version {version_of(curation)}); rerun `lmeye instruct --set instruct.curation={curation}` "
            "so that only its kept images reach training"
        )


def _norm(path: str) -> str:
    import os

    return path.rstrip("/") if "://" in path else os.path.abspath(path)
