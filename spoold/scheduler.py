"""Which job next: each tenant in turn, few model swaps, nobody starved.

Jobs run together up to `[spool] max_active_jobs`; when more wait, the
order of claims decides who waits. By age alone, one tenant's 500 queued
batches would all be claimed before another tenant's one batch that came a
second later, whatever the in-flight window then shares (window.py). So
tenants take turns: the next claim goes to the tenant with the fewest jobs
running, among those to the one whose last turn is longest ago, and within
a tenant to its heaviest job (`priority`), then its oldest. A tenant is an
API key, or for filesystem drops the user who owns them (jobrecord.user_tenant):
one person's 500 drops do not hold back another person's one.

Loading a model takes from seconds to minutes, so among the waiting work
(this host's claimed jobs and the complete drops in the inbox) the work for
the model already loaded goes first; but a job for another model waits at
most `[models] max_wait_seconds`, counted from when it came or from when
the loaded model was loaded, whichever is later. So each model keeps the
engine for at least that long while another's work waits (swaps stay few),
and no longer (nobody starves behind a model with endless work).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
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
    #: whose it is: the API key's name, "" for a filesystem drop
    tenant: str = ""
    #: its `priority` (1-100): heavier goes first within its tenant
    weight: int = 1


def fair_order(candidates: list[Candidate], running: Mapping[str, int],
               turns: Mapping[str, int] | None = None) -> list[Candidate]:
    """The candidates in the order tenants take turns.

    `running`: each tenant's jobs running now; `turns`: when each tenant's
    last turn was (a count that grows; never: 0). Each next place goes to
    the tenant with the fewest jobs running or placed before, then the
    longest since its turn, then whose next candidate waited longest; a
    tenant's own candidates go heaviest first, then oldest first.
    """
    queues: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (-c.weight, c.since)):
        queues.setdefault(c.tenant, []).append(c)
    if len(queues) <= 1:
        return next(iter(queues.values()), [])
    turns = turns or {}
    clock = max(turns.values(), default=0)
    heap = [(running.get(tenant, 0), turns.get(tenant, 0), queue[0].since, tenant, 0)
            for tenant, queue in queues.items()]
    heapq.heapify(heap)
    ordered = []
    while heap:
        load, _, _, tenant, index = heapq.heappop(heap)
        queue = queues[tenant]
        ordered.append(queue[index])
        clock += 1
        if index + 1 < len(queue):
            heapq.heappush(heap, (load + 1, clock, queue[index + 1].since, tenant, index + 1))
    return ordered


def overdue(candidate: Candidate, loaded: str, loaded_at: float, max_wait: float, now: float) -> bool:
    """Whether `candidate` needs another model than `loaded` (loaded at `loaded_at`) and has waited for
    it past `max_wait`: from when it came, or from the load, whichever is later."""
    return candidate.model not in (None, loaded) and now - max(candidate.since, loaded_at) > max_wait


def in_order(candidates: list[Candidate], loaded: str, max_wait: float, now: float,
             running: Mapping[str, int] | None = None, turns: Mapping[str, int] | None = None,
             loaded_at: float = 0.0) -> list[Candidate]:
    """The candidates in the order to try them: first the one to run next, then in `fair_order`.

    The one to run next is the first that needs the loaded model (or any),
    unless one needs another model and is `overdue`: then the one of those
    that came first is, and its model is swapped to.
    """
    if not candidates:
        return []
    fair = fair_order(candidates, running or {}, turns)
    late = [c for c in candidates if overdue(c, loaded, loaded_at, max_wait, now)]
    if late:
        first = min(late, key=lambda c: c.since)
    else:
        first = next((c for c in fair if c.model in (None, loaded)), fair[0])
    return [first] + [c for c in fair if c is not first]
