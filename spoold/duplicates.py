"""Finding repeated custom_ids in a file of any length with bounded memory.

The validation pass hands every custom_id to a `DuplicateFinder`, which
keeps only a 64-bit hash and the line number (16 bytes) and, every
`RUN_ENTRIES` lines, sorts what it holds and spills it to an unnamed
temporary file as one sorted run. Once the file is read, `suspects()` walks
the runs one slice of the hash space at a time and returns the lines whose
hash occurs more than once. Memory stays at about one run (1 MiB) however
long the file is; it grows only with the number of suspect lines.

A hash match is only a suspicion: the caller reads those few lines again
and compares the custom_ids themselves (`validation.repeated_requests`), so
a hash collision can never turn a good line into an error.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterator
from typing import IO

import numpy as np

#: Entries held in memory before a sorted run is spilled (16 bytes each).
RUN_ENTRIES = 1 << 16

#: The hash space is cut into this many slices by its top bits; each run
#: records where every slice starts, so merging reads one slice at a time.
SLICE_BITS = 12

_ITEM = 8  # bytes per hash and per line number


class DuplicateFinder:
    """Collects (custom_id, line) pairs; afterwards names the lines that may repeat one.

    Hashes are Python's own `hash()` of the string: fast, already cached on
    the str, and consistent within the process that does the whole check.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None, run_entries: int = RUN_ENTRIES) -> None:
        self._spill_dir = spill_dir
        self._run_entries = run_entries
        self._hashes = array("q")
        self._lines = array("q")
        self._file: IO[bytes] | None = None
        #: per spilled run: its offset in the file, its length, where each hash slice starts
        #: (16 KiB a run: the only state that grows with the file, 0.25 bytes a line)
        self._runs: list[tuple[int, int, np.ndarray]] = []
        #: entries per hash slice over all runs
        self._slice_sizes = np.zeros(1 << SLICE_BITS, np.int64)

    def add(self, line: int, custom_id: str) -> None:
        """Note that `line` has `custom_id` (lines must come in increasing order)."""
        self._hashes.append(hash(custom_id))
        self._lines.append(line)
        if len(self._lines) >= self._run_entries:
            self._spill()

    def suspects(self) -> np.ndarray:
        """Sorted line numbers whose custom_id hash also occurs on another line."""
        if not self._runs:
            hashes, lines = self._take_buffer()
            return np.sort(_suspects(hashes, lines))
        if len(self._lines):
            self._spill()
        found = []
        for lo, hi in self._slice_groups():
            # Runs hold increasing line numbers, so concatenated in run
            # order the lines of one hash stay in file order.
            parts = [self._read_slice(run, lo, hi) for run in self._runs]
            found.append(_suspects(np.concatenate([h for h, _ in parts]), np.concatenate([l for _, l in parts])))
        return np.sort(np.concatenate(found))

    def close(self) -> None:
        """Drop the spilled runs (the file is unnamed: a crash leaves nothing behind)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._runs.clear()

    def __enter__(self) -> DuplicateFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        hashes, lines = np.frombuffer(self._hashes, np.int64), np.frombuffer(self._lines, np.int64)
        self._hashes, self._lines = array("q"), array("q")
        return hashes, lines

    def _spill(self) -> None:
        hashes, lines = self._take_buffer()
        order = np.argsort(hashes, kind="stable")
        hashes, lines = hashes[order], lines[order]
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._spill_dir, prefix=".spoold-ids-")
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(hashes)
        self._file.write(lines)
        half = 1 << (SLICE_BITS - 1)
        starts = np.searchsorted(hashes >> (64 - SLICE_BITS), np.arange(-half, half + 1), side="left")
        starts = starts.astype(np.int32)  # a run never holds 2**31 entries
        self._slice_sizes += np.diff(starts)
        self._runs.append((offset, len(hashes), starts))

    def _slice_groups(self) -> Iterator[tuple[int, int]]:
        """Consecutive hash slices [lo, hi) whose entries, over all runs, fit about one run in memory."""
        lo, held = 0, 0
        for index, size in enumerate(self._slice_sizes.tolist()):
            if held and held + size > self._run_entries:
                yield lo, index
                lo, held = index, 0
            held += size
        yield lo, len(self._slice_sizes)

    def _read_slice(self, run: tuple[int, int, np.ndarray], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        offset, length, starts = run
        first, count = int(starts[lo]), int(starts[hi] - starts[lo])
        return (self._read(offset + first * _ITEM, count),
                self._read(offset + (length + first) * _ITEM, count))

    def _read(self, position: int, count: int) -> np.ndarray:
        values = np.empty(count, np.int64)
        self._file.seek(position)
        if self._file.readinto(values) != values.nbytes:
            raise OSError("a spilled run of custom_id hashes came back short")
        return values


def _suspects(hashes: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The lines whose hash occurs more than once (lines of equal hashes in file order on input)."""
    if len(hashes) < 2:
        return np.empty(0, np.int64)
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    same = hashes[1:] == hashes[:-1]
    repeated = np.zeros(len(hashes), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    return lines[order][repeated]
