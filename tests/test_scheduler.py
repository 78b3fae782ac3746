from spoold.scheduler import Candidate, in_order


def names(cands):
    return [c.item for c in cands]


def test_the_loaded_models_work_goes_first_even_when_younger():
    waiting = [Candidate("b-old", "B", 100.0), Candidate("a-new", "A", 200.0), Candidate("any", None, 300.0)]
    assert names(in_order(waiting, "A", max_wait=600, now=400.0)) == ["a-new", "b-old", "any"]


def test_an_old_job_is_not_starved_past_max_wait():
    waiting = [Candidate("b-old", "B", 100.0), Candidate("a-new", "A", 200.0)]
    assert names(in_order(waiting, "A", max_wait=600, now=701.0)) == ["b-old", "a-new"]


def test_oldest_first_when_it_needs_the_loaded_model_or_any():
    assert names(in_order([Candidate("x", None, 5.0), Candidate("y", "A", 1.0)], "B", 600, 10.0))[0] == "x"
    assert names(in_order([Candidate("x", "B", 5.0), Candidate("y", "C", 9.0)], "A", 600, 10.0)) == ["x", "y"]
    assert in_order([], "A", 600, 0.0) == []
