"""A set of line numbers held as one bit per line.

A restart must remember which input lines already have a result; for a
file of a million lines a Python set of ints costs ~60 MB, a bitmap 125 KB.
"""

from __future__ import annotations

from collections.abc import Iterable


class LineSet:
    """Line numbers (>= 0) as a growable bitmap: `in`, `add`, `len`."""

    __slots__ = ("_bits", "_count")

    def __init__(self, lines: Iterable[int] = ()) -> None:
        self._bits = bytearray()
        self._count = 0
        for line in lines:
            self.add(line)

    def add(self, line: int) -> None:
        """Remember one line number."""
        index, bit = line >> 3, 1 << (line & 7)
        if index >= len(self._bits):
            # Grow by half again, so a file read line by line costs few copies.
            self._bits.extend(bytes(max(index + 1 - len(self._bits), len(self._bits) >> 1, 64)))
        if not self._bits[index] & bit:
            self._bits[index] |= bit
            self._count += 1

    def __contains__(self, line: object) -> bool:
        if not isinstance(line, int) or line < 0:
            return False
        index = line >> 3
        return index < len(self._bits) and bool(self._bits[index] >> (line & 7) & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        for index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1:
                        yield index * 8 + bit

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LineSet):
            return set(self) == set(other)
        if isinstance(other, (set, frozenset)):
            return set(self) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"LineSet({len(self)} lines)"
