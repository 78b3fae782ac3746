"""What a person is told when the kernel keeps them out of part of the spool: whose it is, how to get in.

As packaged, the spool is shared through groups: members of `spoold-submit`
may write inbox/, read outbox/ and look into processing/, which only spoold
writes. A user outside a group meets EACCES somewhere deep inside a verb;
the sentence here names the directory that said no, its owner, group and
mode, and the ways in.
The commonest case gets its own words: a user added to the group who has not
logged in again since, whose processes do not have the group yet.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


def refused(e: PermissionError) -> str:
    """One line, for after `spoold: `, saying what refused this user and what to do about it."""
    user = user_name(os.geteuid())
    if not e.filename:
        return f"permission denied to {user}: {e.strerror or e}"
    path, st = closed_part(Path(os.fsdecode(e.filename)))
    if st is None:
        return f"{e.filename}: permission denied to {user}"
    return advice(path, st, user, group_name(st.st_gid), _members(st.st_gid),
                  in_group=st.st_gid == os.getegid() or st.st_gid in os.getgroups())


def advice(path: Path, st: os.stat_result, user: str, group: str, members: list[str], in_group: bool) -> str:
    """The sentence for `path` (as `st` says it is) refusing `user`, given the group's listed `members`
    and whether this process has the group."""
    what = f"{path} (owner {user_name(st.st_uid)}, group {group}, {stat.filemode(st.st_mode)})"
    group_bits, other_bits = (st.st_mode >> 3) & 7, st.st_mode & 7
    if in_group or not group_bits & ~other_bits:  # joining would not help: the part is the owner's alone
        return f"{what} is closed to {user}, group members included: run it as root or as its owner"
    if user in members:
        return (f"{what} is closed to {user}: {user} was added to group {group} after this login began, so it "
                f"does not have the group yet; log out and in again (or run `newgrp {group}`)")
    return (f"{what} is closed to {user}, who is not in group {group}: ask for it (sudo usermod -aG {group} "
            f"{user}, then log in again), or run it as root")


def closed_part(path: Path) -> tuple[Path, os.stat_result | None]:
    """The nearest of `path` and its parents that this user can see: the one that keeps them out."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate)
        except OSError:
            continue
    return path, None


def user_name(uid: int) -> str:
    """The login name of `uid`, or `uid N` where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    """The name of group `gid`, or the number where it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _members(gid: int) -> list[str]:
    """Who /etc/group lists in group `gid` (a login that began before a user was added lacks it)."""
    try:
        return grp.getgrgid(gid).gr_mem
    except KeyError:
        return []
