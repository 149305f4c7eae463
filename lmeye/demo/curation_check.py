"""The curate stage's verdicts on the demo corpus, scored against the planted truth.

For each filter: the rows it removed, and its precision and recall against what was planted for it
(``lmeye.demo.planted``):

* ``duplicate``: a planted pair (original, copy) is found when one of the two was dropped as a
  duplicate of the other (the curate stage keeps the smaller uid of a group, which may be the copy);
  a dropped row is right when it and the row it duplicates are a planted pair;
* ``contaminated``: the planted benchmark copies;
* ``clip_score``: the mismatched captions (when the filter is on).

Other reasons (``not_downloaded`` for the corpus's broken entries, ...) are listed with their counts
and no truth. Rows map to planted files by the file name that ends their URL.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from lmeye.demo.planted import BENCHMARK, EXACT, MISMATCHED, NEAR, Planted
from schemas.curation import CLIP_SCORE, CONTAMINATED, DUPLICATE

# filter (reason) -> the planted kinds it should remove
TRUTH = {DUPLICATE: (EXACT, NEAR), CONTAMINATED: (BENCHMARK,), CLIP_SCORE: (MISMATCHED,)}


@dataclass(frozen=True)
class FilterScore:
    filter: str
    removed: int
    planted: int  # the cases planted for it (pairs, for duplicates)
    found: int
    precision: Optional[float]  # None: it removed nothing, or nothing is planted for it
    recall: Optional[float]  # None: nothing planted for it
    by_how: dict[str, tuple[int, int]]  # how the case was made -> (found, planted)

    def line(self) -> str:
        p = "-" if self.precision is None else f"{self.precision:.3f}"
        r = "-" if self.recall is None else f"{self.recall:.3f}"
        return f"{self.filter} P {p} R {r} ({self.found}/{self.planted})"


def _ratio(num: int, den: int) -> Optional[float]:
    return num / den if den else None


def score_curation(curation, pairs, planted: list[Planted]) -> list[FilterScore]:
    """Per filter, what the ``curation`` table removed against ``planted`` (``pairs``: uid and url columns)."""
    name_of = {uid: url.rsplit("/", 1)[-1] for uid, url in zip(pairs["uid"].to_pylist(), pairs["url"].to_pylist())}
    rows = curation.select(["uid", "reasons", "duplicate_of"]).to_pylist()
    by_kind: dict[str, list[Planted]] = {}
    for p in planted:
        by_kind.setdefault(p.kind, []).append(p)
    removed: dict[str, list[dict]] = {}
    for row in rows:
        for reason in row["reasons"]:
            removed.setdefault(reason, []).append(row)
    out = []
    for reason in sorted(set(removed) | set(TRUTH)):
        dropped = removed.get(reason, [])
        cases = [p for kind in TRUTH.get(reason, ()) for p in by_kind.get(kind, [])]
        if reason == DUPLICATE:
            pairs_planted = {frozenset((p.name, p.original)): p for p in cases}
            dropped_pairs = [frozenset((name_of.get(r["uid"]), name_of.get(r["duplicate_of"]))) for r in dropped]
            right = sum(pair in pairs_planted for pair in dropped_pairs)
            found = [pairs_planted[pair] for pair in set(dropped_pairs) if pair in pairs_planted]
        else:
            names = {p.name: p for p in cases}
            found = [names[n] for n in {name_of.get(r["uid"]) for r in dropped} if n in names]
            right = len(found)
        planted_how = Counter(p.how if p.kind != MISMATCHED else p.kind for p in cases)
        found_how = Counter(p.how if p.kind != MISMATCHED else p.kind for p in found)
        out.append(FilterScore(
            filter=reason, removed=len(dropped), planted=len(cases), found=len(found),
            precision=_ratio(right, len(dropped)) if reason in TRUTH else None, recall=_ratio(len(found), len(cases)),
            by_how={h: (found_how[h], n) for h, n in sorted(planted_how.items())},
        ))
    return out


def summary_line(scores: list[FilterScore], off: tuple[str, ...] = ()) -> str:
    """One line for the console: each filter with planted cases (or, apart from failed downloads, removals)."""
    parts = []
    for s in scores:
        if s.filter in off:
            parts.append(f"{s.filter} off ({s.planted} planted)")
        elif s.planted or (s.removed and s.filter != "not_downloaded"):
            parts.append(s.line())
    return "; ".join(parts)


def read_and_score(curation_path: str, pairs_path: str, planted: list[Planted]) -> list[FilterScore]:
    """``score_curation`` on the tables at these paths."""
    from lmeye.tables import TableReader
    from schemas.curation import CURATION
    from schemas.pairs import PAIRS

    curation = TableReader(curation_path, CURATION).read(columns=["uid", "reasons", "duplicate_of"])
    pairs = TableReader(pairs_path, PAIRS).read(columns=["uid", "url"])
    return score_curation(curation, pairs, planted)
