"""A set of custom_ids that costs about 16 bytes each, for files of millions of lines.

The duplicate check of the validation pass and the finished lines of a
resumed job both need "have I seen this custom_id?" over the whole file. A
Python set of the ids (or of their digests) costs 80-100 bytes a line: 85
MiB for a 1M-line file. Here each id is kept as a 128-bit digest in two flat
numpy arrays sorted by the digest's high half, found by binary search, plus
a small set of recent ones that is merged into the arrays every RECENT_MAX
ids (numpy merges in one vectorised pass; a pure-Python merge made a 10M-
line file spend minutes folding). 128 bits makes two different ids sharing
a digest a practical impossibility (about 1 in 10^20 for a billion lines),
so membership is exact for any file we will meet.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

import numpy as np

#: Recent ids kept in a plain set before they are folded into the arrays:
#: bounds the set's memory (~8 MiB) and the number of folds (a 1M-line
#: file folds 7 times).
RECENT_MAX = 1 << 17

_LOW = (1 << 64) - 1


def id_digest(custom_id: str) -> int:
    """The 128-bit digest an IdSet keeps for a custom_id."""
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=16).digest(), "big")


class IdSet:
    """custom_ids seen so far: `add`, `in`, `len`; never removes one."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._high = np.empty(0, dtype=np.uint64)  # sorted; ties (2^-64 rare) in any order
        self._low = np.empty(0, dtype=np.uint64)
        self._search = memoryview(self._high)  # bisect on plain ints, not numpy scalars
        self._recent: set[int] = set()
        for custom_id in ids:
            self.add(custom_id)

    def add(self, custom_id: str) -> bool:
        """Remember `custom_id`; False when it was already there."""
        digest = id_digest(custom_id)
        if digest in self._recent or self._in_arrays(digest):
            return False
        self._recent.add(digest)
        if len(self._recent) >= RECENT_MAX:
            self._fold()
        return True

    def __contains__(self, custom_id: object) -> bool:
        if not isinstance(custom_id, str):
            return False
        digest = id_digest(custom_id)
        return digest in self._recent or self._in_arrays(digest)

    def __len__(self) -> int:
        return len(self._high) + len(self._recent)

    def __bool__(self) -> bool:
        return len(self) > 0

    def _in_arrays(self, digest: int) -> bool:
        high, low = digest >> 64, digest & _LOW
        search = self._search
        i = bisect.bisect_left(search, high)
        while i < len(search) and search[i] == high:
            if self._low[i] == low:
                return True
            i += 1
        return False

    def _fold(self) -> None:
        """Merge the recent set into the sorted arrays; no list of all ids is ever built."""
        recent = sorted(self._recent)
        high = np.fromiter((d >> 64 for d in recent), dtype=np.uint64, count=len(recent))
        low = np.fromiter((d & _LOW for d in recent), dtype=np.uint64, count=len(recent))
        at = np.searchsorted(self._high, high)
        # One old array is let go before the next new one is made: the peak
        # is three arrays' worth (24 bytes an id), not four.
        self._search = memoryview(b"")
        self._high = np.insert(self._high, at, high)
        self._low = np.insert(self._low, at, low)
        self._search = memoryview(self._high)
        self._recent = set()
