"""Where an engine's vLLM makes its unix sockets: a directory of that engine's own, gone with it.

vLLM makes each engine's ZeroMQ sockets in VLLM_RPC_BASE_PATH (the
system's temp directory unless set) and leaves them there: seven per engine
start, clean shutdown or not, so a daemon that swaps models or replaces a
dead engine core littered /tmp with them. Each engine gets a directory of
its own inside that base, removed after the engine has shut down; an
exclusive lock on the directory, held while the daemon lives, tells a later
daemon that one whose directory is unlocked died without removing it (a
`kill -9` runs no clean-up), so the next engine start removes it. Of vLLM
it knows only the environment variable, which vLLM documents; the glue to
vLLM's code is `vllm_adapter`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: the longest path a unix socket may have (`sun_path`, less its NUL), as ZeroMQ checks it
SOCKET_PATH_MAX = 107
#: what an engine's directory is called: this prefix and mkdtemp's eight characters
PREFIX = "spoold-rpc-"
OURS = re.compile(re.escape(PREFIX) + r"[a-z0-9_]{8}")
#: what a socket's path adds to VLLM_RPC_BASE_PATH: our directory, then vLLM's "/" and uuid4
ADDED_TO_BASE = len(f"/{PREFIX}12345678/") + 36


@contextlib.contextmanager
def private_rpc_dir() -> Iterator[str]:
    """A directory of this engine's own for vLLM's unix sockets, removed with everything in it after.

    It is made inside the base, so a VLLM_RPC_BASE_PATH an operator set
    still says where the sockets go; the variable is set back as it was
    after. The directories of engines whose daemon died are removed first.
    """
    before = os.environ.get("VLLM_RPC_BASE_PATH")
    base = before or tempfile.gettempdir()
    if len(base) + ADDED_TO_BASE > SOCKET_PATH_MAX:
        yield base  # room for vLLM's own names only: a directory of ours would make them too long to bind
        return
    remove_dead_rpc_dirs(base)
    path, held = _locked_dir(base)
    os.environ["VLLM_RPC_BASE_PATH"] = path
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("VLLM_RPC_BASE_PATH", None)
        else:
            os.environ["VLLM_RPC_BASE_PATH"] = before
        shutil.rmtree(path, ignore_errors=True)
        os.close(held)


def remove_dead_rpc_dirs(base: str) -> int:
    """Remove the socket directories in `base` whose engine's daemon is gone; returns how many.

    A directory counts as dead when it is ours by name and owner, holds
    nothing but sockets, and its lock can be taken: the lock goes with the
    last process that held it, so a live daemon's (or its engine
    processes') directory is never touched, whatever namespace it runs in.
    """
    removed = 0
    try:
        entries = [e for e in os.scandir(base) if OURS.fullmatch(e.name)]
    except OSError:
        return 0
    for entry in entries:
        try:
            held = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, not a directory, or not ours to open
        try:
            if _only_sockets_of_ours(held) and _try_lock(held):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        finally:
            os.close(held)
    if removed:
        log.info("removed %d socket director%s left in %s by engines whose daemon was killed",
                 removed, "y" if removed == 1 else "ies", base)
    return removed


def _locked_dir(base: str) -> tuple[str, int]:
    """A new directory in `base`, and an open descriptor holding its lock.

    Another daemon's sweep may take a directory in the moment between its
    making and its locking (it is empty and unlocked, as a dead one is):
    then the lock is had only once that directory is gone, and another is made.
    """
    while True:
        path = tempfile.mkdtemp(prefix=PREFIX, dir=base)
        try:
            held = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        fcntl.flock(held, fcntl.LOCK_EX)
        if os.fstat(held).st_nlink:
            return path, held
        os.close(held)


def _only_sockets_of_ours(held: int) -> bool:
    try:
        if os.fstat(held).st_uid != os.geteuid():
            return False
        with os.scandir(held) as entries:
            return all(stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode) for e in entries)
    except OSError:
        return False  # changing under us: left for the next look


def _try_lock(held: int) -> bool:
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
