"""Durable file operations: write, fsync the file, rename, fsync the directory.

These are PostgreSQL's durable_rename and Maildir's delivery rules in a few
functions. A rename or a new directory entry survives a power cut only once
its parent directory has been fsynced, so every helper here does both halves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import io
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


async def finish_in_thread(step: Callable[..., Any], *args: Any) -> Any:
    """`step(*args)` in a worker thread, awaited to its end even if the caller is cancelled meanwhile.

    Off the event loop, one job's fsyncs overlap other jobs' (the disk
    commits concurrent fsyncs together) instead of stalling all of them.
    A durable step once begun is finished, as it was when it blocked the
    loop: a cancel waits for it, then goes on up.
    """
    work = asyncio.ensure_future(asyncio.to_thread(step, *args))
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:
            break  # the step failed: work.result() raises its error below
    if cancelled:
        if not work.cancelled():
            work.exception()  # retrieved, so asyncio does not log it: the cancel is what goes up
        raise asyncio.CancelledError
    return work.result()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a directory (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename and fsync both parent directories (once if they are the same)."""
    os.rename(src, dst)
    dst_parent = Path(dst).parent
    fsync_dir(dst_parent)
    if Path(src).parent != dst_parent:
        fsync_dir(Path(src).parent)


def durable_mkdir(path: Path, mode: int = 0o750) -> None:
    """Create a directory (and missing parents) and make its entry durable."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


@contextlib.contextmanager
def hidden_temp(directory: Path, name: str, mode: int = 0o640, gid: int = -1,
                sync: bool = True) -> Iterator[tuple[int, Path]]:
    """A new hidden temp file in `directory` for writing: yields (fd, path).

    Scanners skip it (dot prefix, `.tmp` suffix). On success its data is
    fsynced (unless `sync` is False) and it is closed, ready to be renamed
    into place; on failure it is removed.
    """
    tmp = Path(directory) / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if gid >= 0:
            os.fchown(fd, -1, gid)
        yield fd, tmp
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o640) -> Iterator[IO[bytes]]:
    """A buffered file whose bytes become `path`, whole and durably, when the block ends without error;
    readers see the old file or the new one, never a part (a failed block leaves `path` as it was)."""
    path = Path(path)
    with hidden_temp(path.parent, path.name, mode) as (fd, tmp):
        out = io.BufferedWriter(io.FileIO(fd, "w", closefd=False), 1 << 20)
        yield out
        out.flush()
    os.rename(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o640, gid: int = -1) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never half."""
    path = Path(path)
    with hidden_temp(path.parent, path.name, mode, gid) as (fd, tmp):
        write_all(fd, data)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o640, gid: int = -1) -> None:
    """atomic_write_bytes for a JSON document (pretty, so people can read it)."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write_bytes(path, data, mode, gid)


def replace_json(path: Path, obj: Any, mode: int = 0o640, gid: int = -1) -> None:
    """Replace `path` with a JSON document atomically, but without making it durable.

    For files rewritten every few seconds whose loss in a power cut costs
    nothing (heartbeats): readers still never see half a file, and no
    fsync per beat competes with the results' group commits.
    """
    path = Path(path)
    with hidden_temp(path.parent, path.name, mode, gid, sync=False) as (fd, tmp):
        write_all(fd, (json.dumps(obj, indent=2) + "\n").encode())
    os.rename(tmp, path)


def open_append(path: Path, mode: int = 0o640, gid: int = -1) -> int:
    """Open (creating if needed) a results file for appending; returns the fd.

    A newly created file's directory entry is made durable at once, so an
    fsync of its data is never lost with its name.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    if gid >= 0:
        os.fchown(fd, -1, gid)
    fsync_dir(Path(path).parent)
    return fd


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """rename(2) that never replaces `dst`: FileExistsError if it exists, atomically.

    renameat2(RENAME_NOREPLACE) where the kernel and file system have it;
    elsewhere (older NFS) a check just before the rename, which a writer
    racing in the same instant can still beat.
    """
    src, dst = os.fsencode(src), os.fsencode(dst)
    libc = _libc()
    if libc is not None and hasattr(libc, "renameat2"):
        if libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    os.rename(src, dst)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (short writes happen on full disks)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
