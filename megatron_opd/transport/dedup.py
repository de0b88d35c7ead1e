"""A compact set of sample ids for exactly-once acceptance, exportable as plain data.

Sample ids in this project are "<run>-<counter:09d>" or "<run>-<counter:09d>-<member>" (GRPO
groups). `SeenIds` splits an id at its longest run of digits (the last one on ties) into
(prefix, digit count, suffix) and an integer, and keeps per (prefix, width, suffix) a sorted
list of disjoint integer intervals. Ids drawn from a counter therefore cost memory per *gap*
(dropped groups, out-of-order arrival), not per id: a million in-order ids are one interval.
Ids without digits (or with more than 18) go to a plain set. The mapping is exact both ways
("x-007" is (("x-", 3, ""), 7) and back), so membership never confuses two ids.

`to_state()` is plain JSON-able data ({"format", "ranges", "other"}); `from_state` validates it.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from functools import lru_cache
from typing import Iterable, Iterator

FORMAT = "megatron-opd/seen-ids/1"
_DIGITS = re.compile(r"\d+")


@lru_cache(maxsize=4096)  # the server splits each id twice (duplicate check, then add)
def _split(sample_id: str) -> tuple[tuple[str, int, str], int] | None:
    best = None
    for m in _DIGITS.finditer(sample_id):
        if best is None or len(m.group()) >= len(best.group()):
            best = m
    if best is None or len(best.group()) > 18 or not best.group().isascii():
        return None
    return (sample_id[:best.start()], len(best.group()), sample_id[best.end():]), int(best.group())


class _Intervals:
    __slots__ = ("starts", "ends")

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []  # exclusive

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self.starts, n) - 1
        return i >= 0 and n < self.ends[i]

    def add(self, n: int) -> bool:
        starts, ends = self.starts, self.ends
        i = bisect_right(starts, n) - 1
        if i >= 0 and n < ends[i]:
            return False
        joins_left = i >= 0 and ends[i] == n
        joins_right = i + 1 < len(starts) and starts[i + 1] == n + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = n + 1
        elif joins_right:
            starts[i + 1] = n
        else:
            starts.insert(i + 1, n)
            ends.insert(i + 1, n + 1)
        return True

    def __iter__(self) -> Iterator[int]:
        for a, b in zip(self.starts, self.ends):
            yield from range(a, b)


class SeenIds:
    """Set of sample ids: add / in / len / iteration, plus `to_state` / `from_state`."""

    def __init__(self, ids: Iterable[str] = ()):
        self._ranges: dict[tuple[str, int, str], _Intervals] = {}
        self._other: set[str] = set()
        self._n = 0
        for i in ids:
            self.add(i)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, sample_id: str) -> bool:
        split = _split(sample_id)
        if split is None:
            return sample_id in self._other
        iv = self._ranges.get(split[0])
        return iv is not None and split[1] in iv

    def add(self, sample_id: str) -> bool:
        """Add; True if it was new."""
        split = _split(sample_id)
        if split is None:
            new = sample_id not in self._other
            self._other.add(sample_id)
        else:
            new = self._ranges.setdefault(split[0], _Intervals()).add(split[1])
        self._n += new
        return new

    def __iter__(self) -> Iterator[str]:
        for (prefix, width, suffix), iv in self._ranges.items():
            for n in iv:
                yield f"{prefix}{n:0{width}d}{suffix}"
        yield from self._other

    @property
    def intervals(self) -> int:
        """Stored intervals + loose ids: what memory is proportional to."""
        return sum(len(iv.starts) for iv in self._ranges.values()) + len(self._other)

    def to_state(self) -> dict:
        return {"format": FORMAT,
                "ranges": [[p, w, s, [x for ab in zip(iv.starts, iv.ends) for x in ab]]
                           for (p, w, s), iv in self._ranges.items()],
                "other": sorted(self._other)}

    @classmethod
    def from_state(cls, state: dict) -> "SeenIds":
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a seen-ids state of format {FORMAT!r}")
        out = cls()
        for entry in state.get("ranges", []):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 4):
                raise ValueError("seen-ids state: bad range entry")
            p, w, s, flat = entry
            if not (isinstance(p, str) and isinstance(s, str) and isinstance(w, int)
                    and 1 <= w <= 18 and isinstance(flat, (list, tuple)) and len(flat) % 2 == 0):
                raise ValueError("seen-ids state: bad range entry")
            iv, prev = _Intervals(), -1
            for a, b in zip(flat[::2], flat[1::2]):
                if not (isinstance(a, int) and isinstance(b, int) and prev < a < b
                        and len(str(b - 1)) <= w):
                    raise ValueError("seen-ids state: intervals must be sorted, disjoint, "
                                     "non-adjacent and fit the width")
                iv.starts.append(a)
                iv.ends.append(b)
                out._n += b - a
                prev = b
            # the split of a reconstructed id must land on the same key, else membership breaks
            if iv.starts and _split(f"{p}{iv.starts[0]:0{w}d}{s}") != ((p, w, s), iv.starts[0]):
                raise ValueError(f"seen-ids state: key {(p, w, s)!r} is not canonical")
            out._ranges[(p, w, s)] = iv
        for i in state.get("other", []):
            if not isinstance(i, str):
                raise ValueError("seen-ids state: other ids must be strings")
            out.add(i)
        return out
