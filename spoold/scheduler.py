"""Which job next, when jobs need different models: few swaps, nobody starved.

Loading a model takes from seconds to minutes, so among the waiting work
(this host's claimed jobs and the complete drops in the inbox) the work for
the model already loaded goes first; but never past an older job that has
waited longer than `[models] max_wait_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    """A job or drop that could run next."""

    #: a JobDir (claimed) or a drop's name in the inbox
    item: Any
    #: the model it needs first; None when any will do (or it cannot be told)
    model: str | None
    #: when it started waiting (epoch seconds)
    since: float


def in_order(candidates: list[Candidate], loaded: str, max_wait: float, now: float) -> list[Candidate]:
    """The candidates in the order to try them: first the one to run next, then by age."""
    by_age = sorted(candidates, key=lambda c: c.since)
    if not by_age:
        return []
    oldest = by_age[0]
    if oldest.model in (None, loaded) or now - oldest.since > max_wait:
        return by_age
    same = [c for c in by_age if c.model in (None, loaded)]
    return same[:1] + [c for c in by_age if c is not (same[0] if same else None)]
