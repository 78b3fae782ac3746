"""How long to wait before trying again: doubling waits with jitter, and how many tries a line gets.

A leaf module: the webhook sender, the job runner (a line the engine
answered with a 5xx) and the engine host (a model that failed to load)
all wait the same way, so many failures at once do not come back at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_seconds(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after `failures` failed tries: `first`, then twice as long each time, capped,
    times a random 0.5-1.0 so that things failing together are not retried together."""
    return min(cap, first * 2 ** (max(failures, 1) - 1)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class RetryPolicy:
    """`[engine] max_attempts` and `retry_backoff_seconds`: how often a transient failure is tried again.

    Transient: a 5xx answer from the engine, an engine that died under the
    request, a model that failed to load. A 4xx answer or a line that does
    not validate is the line's own fault and is never tried again.
    """

    max_attempts: int = 3
    first_backoff_seconds: float = 1.0
    #: no wait is longer than this, however many tries failed
    max_backoff_seconds: float = 60.0

    def wait(self, failures: int) -> float:
        """Seconds before the next try after `failures` failed ones."""
        return backoff_seconds(failures, self.first_backoff_seconds, self.max_backoff_seconds)
