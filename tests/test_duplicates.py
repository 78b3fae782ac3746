import random

import pytest

from spoold.duplicates import DuplicateFinder


def expected_suspects(pairs):
    lines_of = {}
    for line, custom_id in pairs:
        lines_of.setdefault(custom_id, []).append(line)
    return sorted(line for lines in lines_of.values() if len(lines) > 1 for line in lines)


@pytest.mark.parametrize("run_entries", [100, 1000, 1 << 16])  # spilled a lot, a little, not at all
def test_every_line_of_a_repeated_custom_id_is_a_suspect_whatever_the_spill(tmp_path, run_entries):
    rng = random.Random(run_entries)
    ids = [f"candidate-{i}" for i in range(5000)]
    pairs = [(n, cid) for n, cid in enumerate(ids, 1)]
    pairs += [(len(pairs) + k + 1, rng.choice(ids)) for k in range(40)]
    pairs += [(len(pairs) + k + 1, "same") for k in range(300)]
    with DuplicateFinder(tmp_path, run_entries) as finder:
        for line, custom_id in pairs:
            finder.add(line, custom_id)
        assert finder.suspects().tolist() == expected_suspects(pairs)


def test_no_repeats_no_suspects_and_the_spill_leaves_no_file(tmp_path):
    with DuplicateFinder(tmp_path, run_entries=100) as finder:
        for line in range(1, 1001):
            finder.add(line, f"c-{line}")
        assert finder.suspects().tolist() == []
    assert list(tmp_path.iterdir()) == []


def test_memory_is_one_run_however_long_the_file(tmp_path):
    finder = DuplicateFinder(tmp_path, run_entries=1000)
    for line in range(1, 100_001):
        finder.add(line, f"c-{line}")
        assert len(finder._lines) < 1000  # the rest is on disk
    assert finder.suspects().tolist() == []
    finder.close()
