import os
import pwd

from spoold.access import advice, closed_part


def test_the_sentence_says_which_way_in_fits_this_user(tmp_path):
    closed = tmp_path / "outbox"
    closed.mkdir(mode=0o750)
    closed.chmod(0o2750)
    st = os.stat(closed)
    what = f"{closed} (owner {pwd.getpwuid(os.getuid()).pw_name}, group spoold-submit, drwxr-s---)"

    assert advice(closed, st, "carol", "spoold-submit", ["alice"], in_group=False) == (
        f"{what} is closed to carol, who is not in group spoold-submit: ask for it "
        f"(sudo usermod -aG spoold-submit carol, then log in again), or run it as root")
    # added to the group since this login began: the commonest case, and usermod again would not help
    assert advice(closed, st, "carol", "spoold-submit", ["alice", "carol"], in_group=False) == (
        f"{what} is closed to carol: carol was added to group spoold-submit after this login began, so it "
        f"does not have the group yet; log out and in again (or run `newgrp spoold-submit`)")
    # the group has it and is kept out too (processing/ is the daemon's alone): joining would not help
    assert advice(closed, st, "alice", "spoold-submit", ["alice"], in_group=True) == (
        f"{what} is closed to alice, group members included: run it as root or as its owner")
    # nor where the group may do no more than anyone (a spool root of 0755 to a daemon run as a user)
    closed.chmod(0o755)
    st = os.stat(closed)
    assert advice(closed, st, "carol", "spoold-submit", [], in_group=False) == (
        f"{what.replace('drwxr-s---', 'drwxr-xr-x')} is closed to carol, group members included: run it as "
        f"root or as its owner")


def test_the_part_named_is_the_nearest_one_this_user_can_see(tmp_path):
    (tmp_path / "inbox").mkdir()
    assert closed_part(tmp_path / "inbox" / ".drop.tmp")[0] == tmp_path / "inbox"  # not made yet
    assert closed_part(tmp_path / "inbox")[0] == tmp_path / "inbox"
