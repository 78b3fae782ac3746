"""Records read once: what a listing needs of a directory's entries, kept in memory between listings.

A listing of the API's batches or files looks at the directory every time
(so what was added or deleted shows at once) but reads each entry's record
only the first time it meets it: what a listing sorts and filters by never
changes in a record, and reading every record for every page made a walk
through a month of batches read millions of files. What was read for an
entry that has since gone is kept a while: a client walking pages names the
last entry of its page as its cursor, and that entry may be deleted before
the next page is asked for.

Leaf module: the standard library only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: How many gone entries are remembered (the most recently gone): a cursor of a walk under way.
GONE_KEPT = 10_000


class ReadOnce(Generic[T]):
    """What `read(name)` gave for each entry of a directory, read once per entry (listings run in threads:
    one at a time here)."""

    def __init__(self, read: Callable[[str], T | None]) -> None:
        self._read = read
        self._known: dict[str, T] = {}
        self._gone: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, names: set[str]) -> list[T]:
        """What was read for each of `names`, the directory's entries now: new ones read (an entry `read`
        gives None for is tried again next time), gone ones set aside (`gone`)."""
        with self._lock:
            for gone in self._known.keys() - names:
                self._gone[gone] = self._known.pop(gone)
                if len(self._gone) > GONE_KEPT:
                    self._gone.popitem(last=False)
            for name in names - self._known.keys():
                if (found := self._read(name)) is not None:
                    self._known[name] = found
            return list(self._known.values())

    def gone(self, name: str) -> T | None:
        """What was read for `name` before a listing found it gone (one of the last GONE_KEPT to go);
        None if it is there, or was never read, or went long ago."""
        with self._lock:
            return self._gone.get(name) if name not in self._known else None
