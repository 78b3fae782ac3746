from spoold.lifecycle import DaemonState, JobStatus, Outcome, shown_state


def test_paused_wins_then_stalled_then_the_daemons_own_state():
    assert shown_state(DaemonState.WORKING, paused=True, stalled=True) is DaemonState.PAUSED
    assert shown_state(DaemonState.WORKING, paused=False, stalled=True) is DaemonState.STALLED
    assert shown_state(DaemonState.IDLE, paused=False, stalled=False) is DaemonState.IDLE


def test_states_read_and_write_as_the_plain_strings_of_the_files():
    import json

    assert json.dumps({"status": JobStatus.IN_PROGRESS}) == '{"status": "in_progress"}'
    assert JobStatus("cancelled") is JobStatus.CANCELLED and Outcome.WAITING == "waiting"
    assert f"{DaemonState.STOPPING}" == "stopping"
