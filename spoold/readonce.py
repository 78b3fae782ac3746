"""Records read once: what a listing needs of a directory's entries, kept in memory between listings.

A listing of the API's batches or files looks at the directory every time
(so what was added or deleted shows at once) but reads each entry's record
only the first time it meets it: what a listing sorts and filters by never
changes in a record, and reading every record for every page made a walk
through a month of batches read millions of files.

Leaf module: the standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadOnce(Generic[T]):
    """What `read(name)` gave for each entry of a directory, read once per entry (listings run in threads:
    one at a time here)."""

    def __init__(self, read: Callable[[str], T | None]) -> None:
        self._read = read
        self._known: dict[str, T] = {}
        self._lock = threading.Lock()

    def of(self, names: set[str]) -> list[T]:
        """What was read for each of `names`, the directory's entries now: new ones read (an entry `read`
        gives None for is tried again next time), gone ones forgotten."""
        with self._lock:
            for gone in self._known.keys() - names:
                del self._known[gone]
            for name in names - self._known.keys():
                if (found := self._read(name)) is not None:
                    self._known[name] = found
            return list(self._known.values())
