"""Stage summaries: every stage ends with one screen saying what it did and what failed."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping


@dataclass
class StageSummary:
    stage: str  # "download", "extract", ...
    output: str  # the table written
    rows: int = 0  # rows in the output table
    counts: dict[str, int] = field(default_factory=dict)  # e.g. rows by status, rows by source
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count (failures are data)
    shards_done: int = 0  # shards written by this run
    shards_skipped: int = 0  # shards found finished and left alone
    seconds: float = 0.0
    rate: float | None = None  # items/s of the stage's main work
    rate_unit: str = "rows/s"
    ok: bool = True  # False: the stage could not finish; rerun it to resume
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, top: int = 8) -> str:
        head = "finished" if self.ok else "INCOMPLETE (rerun to resume)"
        lines = [f"== {self.stage} {head}: {self.output}"]
        lines.append(
            f"   rows {self.rows}   shards written {self.shards_done}, already done {self.shards_skipped}"
            f"   {self.seconds:.1f}s" + (f"   {self.rate:.1f} {self.rate_unit}" if self.rate is not None else "")
        )
        if self.counts:
            lines.append("   " + "   ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())))
        if self.failures:
            lines.append(f"   failures ({sum(self.failures.values())}):")
            for reason, n in sorted(self.failures.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"     {n:>7}  {reason[:100]}")
            if len(self.failures) > top:
                lines.append(f"     ... {len(self.failures) - top} more reasons in the manifest")
        lines += [f"   note: {n}" for n in self.notes]
        return "\n".join(lines)


def node_note(counts: dict[str, int], unit: str) -> str:
    """Where the work ran, for a summary: "on 2 Ray nodes (shards per node: 1a2b3c… 3, 4d5e6f… 2)"."""
    per = ", ".join(f"{node[:8]}… {n}" for node, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"on {len(counts)} Ray node(s) ({unit} per node: {per}; full ids in the manifest)"


def sum_counts(counts: Iterable[Mapping[str, int]]) -> Counter:
    """The one sum of per-shard counts (rows ``by_status``, failures by reason, rows by node):
    every stage and the feature store add up its shards' counts here, for summaries and manifests."""
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return total
