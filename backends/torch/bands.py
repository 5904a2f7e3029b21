"""Which rows and keys of a sequence take part: host integer arithmetic, shared by the support checks
(mask sizes) and the kernels' callers."""
from __future__ import annotations

import math
from typing import NamedTuple

INF = math.inf


class Rect(NamedTuple):
    """Rows [r0, r1) of a sequence's queries see some key; together they see keys [k0, k1) only."""
    r0: int
    r1: int
    k0: int
    k1: int
    masked: bool    # some row does not see every key of [k0, k1)
    top_left: bool  # ... and exactly as SDPA's is_causal (row i sees keys k0 .. k0 + i)


def rect(lq: int, lk: int, causal: bool, window: tuple[int, int]) -> Rect:
    """The rectangle of a sequence of lq queries and lk keys; query t sits at position p = t + lk - lq.
    Row p sees keys [lo(p), hi(p)], both non-decreasing in p, so the rows that see something are
    consecutive and the keys they see together are too."""
    left, right = window
    off = lk - lq
    pmin = max(0 if causal else -INF, -right if right >= 0 else -INF)  # hi(p) >= 0
    pmax = lk - 1 + left if left >= 0 else INF                          # lo(p) <= lk - 1
    r0, r1 = int(max(0, pmin - off)), int(min(lq, pmax - off + 1))
    if lk == 0 or r0 >= r1:
        return Rect(0, 0, 0, 0, False, False)

    def lo(p):
        return max(0, p - left) if left >= 0 else 0

    def hi(p):
        return min(lk - 1, p if causal else lk - 1, p + right if right >= 0 else lk - 1)

    first, last = r0 + off, r1 - 1 + off
    k0, k1 = lo(first), hi(last) + 1
    masked = hi(first) != k1 - 1 or lo(last) != k0
    top_left = masked and lo(last) == k0 == hi(first)  # hi(p) then rises by one per row until lk - 1
    return Rect(r0, r1, k0, k1, masked, top_left)


def bounds(cu, total: int) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence (one host sync); one sequence when `cu` is None."""
    if cu is None:
        return [(0, total)]
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))
