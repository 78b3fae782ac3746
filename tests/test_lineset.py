from spoold.lineset import LineSet


def test_holds_exactly_the_lines_added():
    lines = LineSet([5, 1, 1_000_003, 5])
    lines.add(8)
    assert len(lines) == 4
    assert lines == {1, 5, 8, 1_000_003}
    assert 5 in lines and 1_000_003 in lines
    assert 2 not in lines and 1_000_004 not in lines and 10**9 not in lines and -1 not in lines


def test_a_million_lines_cost_bits_not_objects():
    lines = LineSet()
    for n in range(1, 1_000_001):
        lines.add(n)
    assert len(lines) == 1_000_000 and 999_999 in lines
    assert len(lines._bits) < 200_000  # 125 KB of bits, with room to grow
