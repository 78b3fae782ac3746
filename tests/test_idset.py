"""IdSet: exact membership of custom_ids at ~16 bytes each, across its folds."""

from __future__ import annotations

import random

from spoold import idset
from spoold.idset import IdSet


def test_add_reports_new_and_seen_ids_across_folds(monkeypatch):
    monkeypatch.setattr(idset, "RECENT_MAX", 64)  # many folds on a small input
    ids = [f"cand-{i}" for i in range(2000)]
    random.Random(3).shuffle(ids)
    seen = IdSet()
    assert all(seen.add(i) for i in ids)
    assert len(seen) == 2000
    assert not any(seen.add(i) for i in ids)  # every one now a duplicate, folded or recent
    assert all(i in seen for i in ids)
    assert not any(f"cand-{i}" in seen for i in range(2000, 2500))
    assert len(seen) == 2000


def test_ids_that_differ_only_in_case_unicode_or_spacing_are_different():
    seen = IdSet(["a", "é", "a "])
    assert "A" not in seen and "e\u0301" not in seen and " a" not in seen
    assert "a" in seen and "é" in seen and "a " in seen


def test_not_a_string_is_never_in_it():
    seen = IdSet(["1"])
    assert None not in seen and 1 not in seen
    assert not IdSet()


def test_a_million_ids_cost_about_16_bytes_each():
    seen = IdSet(f"row-{i}" for i in range(1_000_000))
    arrays = seen._high.nbytes + seen._low.nbytes
    assert len(seen) == 1_000_000
    assert arrays <= 16 * 1_000_000
    assert len(seen._recent) < idset.RECENT_MAX  # the rest is folded into the arrays
    assert "row-999999" in seen and "row-1000000" not in seen
