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


def test_tenants_take_turns_and_the_one_with_fewest_jobs_running_goes_first():
    waiting = [Candidate(f"a{i}", None, float(i), "alice") for i in range(4)] + [Candidate("b0", None, 10.0, "bob")]
    assert names(in_order(waiting, "A", 600, 20.0, running={"alice": 3})) == ["b0", "a0", "a1", "a2", "a3"]
    assert names(in_order(waiting, "A", 600, 20.0, running={})) == ["a0", "b0", "a1", "a2", "a3"]


def test_with_as_many_jobs_running_the_tenant_whose_turn_is_longest_ago_goes_first():
    waiting = [Candidate(f"a{i}", None, float(i), "alice") for i in range(3)] + [Candidate("b0", None, 10.0, "bob")]
    assert names(in_order(waiting, "A", 600, 20.0, turns={"alice": 7, "bob": 3}))[0] == "b0"
    assert names(in_order(waiting, "A", 600, 20.0, turns={"alice": 1})) == ["b0", "a0", "a1", "a2"]


def test_within_a_tenant_the_heaviest_goes_first_then_the_oldest():
    waiting = [Candidate("old", None, 1.0), Candidate("urgent", None, 9.0, weight=10), Candidate("new", None, 5.0)]
    assert names(in_order(waiting, "A", 600, 20.0)) == ["urgent", "old", "new"]


def test_the_loaded_models_work_still_goes_first_whoever_it_is_for():
    waiting = [Candidate("a0", "B", 1.0, "alice"), Candidate("b0", "A", 5.0, "bob"), Candidate("a1", "A", 6.0, "alice")]
    assert names(in_order(waiting, "A", 600, 20.0, running={"bob": 2}))[0] == "a1"
    assert names(in_order(waiting, "A", 600, 20.0, running={"alice": 2}))[0] == "b0"


def test_a_job_for_another_model_goes_first_once_overdue_even_before_older_work_for_the_loaded_one():
    # A backlog of the loaded model's drops (older) must not hold another model's job past max_wait.
    waiting = [Candidate("a-old", "A", 50.0), Candidate("b", "B", 100.0)]
    assert names(in_order(waiting, "A", max_wait=600, now=701.0)) == ["b", "a-old"]
    assert names(in_order(waiting, "A", max_wait=600, now=699.0)) == ["a-old", "b"]


def test_after_a_swap_the_model_swapped_out_waits_max_wait_from_the_load_however_old_its_jobs():
    # Without it the old job is overdue at once and the engine swaps back and forth with every look.
    waiting = [Candidate("a-old", "A", 50.0), Candidate("b-new", "B", 900.0)]
    assert names(in_order(waiting, "B", max_wait=600, now=1000.0, loaded_at=800.0)) == ["b-new", "a-old"]
    assert names(in_order(waiting, "B", max_wait=600, now=1401.0, loaded_at=800.0)) == ["a-old", "b-new"]
