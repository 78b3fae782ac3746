"""`spoold` with its file-system calls wrapped, for the torture harness only.

Run as `python -m tests.torture.oswrap run --config ...`; the plan comes as
JSON in $SPOOLD_TORTURE:

- `root`: only calls on paths under this directory count;
- `crash_at`: SIGKILL this process just before its Nth counted step (a write,
  fsync, rename, mkdir, unlink, truncate or file creation under `root`), so a
  crash can be walked through every durability boundary one by one;
- `record`: append one JSON line per step to this file, with what an fsync
  made durable (a file's bytes, a directory's entries) and every event the
  daemon published, so a power cut can be rebuilt at any step afterwards;
- `faults`: make matching calls fail with an errno, e.g.
  `{"op": "fsync", "match": "output.jsonl", "errno": "EIO", "skip": 3, "count": 1}`
  or `{"op": "write", "match": "/processing/", "errno": "ENOSPC", "seconds": 7}`
  (every matching call fails for that long from the first one that does);
  ops are the steps above plus `open` (any open, reading too) and `close`
  (the descriptor is closed, then the error raised); a rename
  matches on "SRC -> DST";
- `delays`: seconds to wait before each rename and each directory fsync
  under `root`, e.g. `{"rename": 0.003, "fsync_dir": 0.003}`, as on NFS,
  where every metadata operation is a round trip to the server.

The product has none of this: it lives under tests/ and wraps `os` from
outside, the way an LD_PRELOAD shim would wrap libc.
"""

from __future__ import annotations

import base64
import errno as errno_mod
import json
import os
import signal
import stat
import sys
import threading
import time

ENV = "SPOOLD_TORTURE"

_real = {name: getattr(os, name) for name in
         ("open", "write", "fsync", "rename", "replace", "mkdir", "unlink", "ftruncate", "close")}


class Wrapper:
    """Counts, records and fails the file-system steps of one process."""

    def __init__(self, plan: dict) -> None:
        self.root = os.path.realpath(plan["root"])
        self.crash_at = plan.get("crash_at")
        self.faults = plan.get("faults", [])
        self.delays = plan.get("delays", {})
        self.steps = 0
        self.lock = threading.RLock()
        self.fds: dict[int, str] = {}
        self.generation: dict[int, int] = {}
        self.record_fd = None
        if plan.get("record"):
            self.record_fd = _real["open"](plan["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- bookkeeping -------------------------------------------------------

    def under_root(self, path) -> bool:
        try:
            return self.inside(os.path.abspath(os.fsdecode(path)))
        except (TypeError, ValueError):
            return False

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def fd_path(self, fd: int) -> str | None:
        path = self.fds.get(fd)
        if path is None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None
        return path if self.inside(path) else None

    def identity(self, ino: int) -> str:
        """An inode number plus how often it was created here: numbers get reused."""
        return f"{ino}.{self.generation.get(ino, 0)}"

    def step(self, op: str, path: str, **record) -> None:
        """Count one step; crash or fail it as planned; record it."""
        with self.lock:
            self.steps += 1
            if self.crash_at is not None and self.steps >= self.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.inject(op, path)
            if record:
                self.record(op=op, path=path, step=self.steps, **record)

    def inject(self, op: str, path: str) -> None:
        for fault in self.faults:
            if fault["op"] != op or fault.get("match", "") not in path:
                continue
            if fault.get("skip", 0) > 0:
                fault["skip"] -= 1
                continue
            if "seconds" in fault and "until" not in fault:
                fault["until"] = time.time() + fault["seconds"]  # the window opens at its first failure
            if fault.get("count", 0) > 0 or fault.get("until", 0) > time.time():
                fault["count"] = fault.get("count", 0) - 1
                code = getattr(errno_mod, fault["errno"])
                raise OSError(code, os.strerror(code), path)

    def record(self, **entry) -> None:
        if self.record_fd is not None:
            _real["write"](self.record_fd, (json.dumps(entry) + "\n").encode())

    # -- the wrapped calls ---------------------------------------------------

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None or not self.under_root(path):
            return _real["open"](path, flags, mode, dir_fd=dir_fd)
        path = os.path.abspath(os.fsdecode(path))
        with self.lock:
            self.inject("open", path)
        creating = bool(flags & os.O_CREAT) and not os.path.lexists(path)
        if creating:
            self.step("create", path)
        fd = _real["open"](path, flags, mode)
        self.fds[fd] = path
        if creating:
            ino = os.fstat(fd).st_ino
            self.generation[ino] = self.generation.get(ino, 0) + 1
            self.record(op="create", path=path, id=self.identity(ino), step=self.steps)
        return fd

    def close(self, fd):
        path = self.fds.pop(fd, None)
        _real["close"](fd)
        if path is not None:  # like NFS: the descriptor is gone, the error is reported anyway
            with self.lock:
                self.inject("close", path)

    def write(self, fd, data):
        path = self.fds.get(fd)
        if path is None:
            return _real["write"](fd, data)
        self.step("write", path)
        n = _real["write"](fd, data)
        if self.record_fd is not None:
            self.record(op="write", path=path, id=self.identity(os.fstat(fd).st_ino), n=n, step=self.steps)
        return n

    def fsync(self, fd):
        path = self.fd_path(fd)
        if path is None:
            return _real["fsync"](fd)
        self.step("fsync", path)
        if self.delays.get("fsync_dir") and stat.S_ISDIR(os.fstat(fd).st_mode):
            time.sleep(self.delays["fsync_dir"])  # outside the lock: other threads' steps go on
        _real["fsync"](fd)
        if self.record_fd is not None:
            self.record_durable(fd, path)

    def record_durable(self, fd: int, path: str) -> None:
        """What this fsync made durable: the file's bytes, or the directory's entries."""
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            entries = {}
            for e in os.scandir(fd):
                kind = "d" if e.is_dir(follow_symlinks=False) else "f" if e.is_file(follow_symlinks=False) else "o"
                entries[e.name] = [self.identity(e.inode()), kind]
            self.record(op="fsync_dir", path=path, id=self.identity(st.st_ino), entries=entries, step=self.steps)
        else:
            rfd = _real["open"](f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                data = os.pread(rfd, st.st_size + 1, 0)
            finally:
                _real["close"](rfd)
            self.record(op="fsync_file", path=path, id=self.identity(st.st_ino),
                        data=base64.b64encode(data).decode(), mtime_ns=st.st_mtime_ns, step=self.steps)

    def rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, _name="rename"):
        if src_dir_fd is not None or dst_dir_fd is not None or not self.under_root(src):
            return _real[_name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        src, dst = os.path.abspath(os.fsdecode(src)), os.path.abspath(os.fsdecode(dst))
        self.step("rename", f"{src} -> {dst}")
        if self.delays.get("rename"):
            time.sleep(self.delays["rename"])
        ino = os.lstat(src).st_ino
        _real[_name](src, dst)
        self.record(op="rename", path=src, dst=dst, id=self.identity(ino), step=self.steps,
                    src_parent=self.identity(os.stat(os.path.dirname(src)).st_ino),
                    dst_parent=self.identity(os.stat(os.path.dirname(dst)).st_ino))

    def replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        return self.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, _name="replace")

    def mkdir(self, path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None or not self.under_root(path):
            return _real["mkdir"](path, mode, dir_fd=dir_fd)
        path = os.path.abspath(os.fsdecode(path))
        self.step("mkdir", path)
        _real["mkdir"](path, mode)
        ino = os.lstat(path).st_ino
        self.generation[ino] = self.generation.get(ino, 0) + 1
        self.record(op="mkdir", path=path, id=self.identity(ino), step=self.steps,
                    parent=self.identity(os.stat(os.path.dirname(path)).st_ino))

    def unlink(self, path, *, dir_fd=None):
        if dir_fd is not None or not self.under_root(path):
            return _real["unlink"](path, dir_fd=dir_fd)
        self.step("unlink", os.path.abspath(os.fsdecode(path)))
        return _real["unlink"](path)

    def ftruncate(self, fd, length):
        path = self.fd_path(fd)
        if path is not None:
            self.step("truncate", path)
        return _real["ftruncate"](fd, length)

    def install(self) -> None:
        for name in _real:
            setattr(os, name, getattr(self, name))
        self.hook_events()

    def hook_events(self) -> None:
        """Record what the daemon announced, in order with its file-system steps."""
        from spoold.events import EventPublisher

        publish = EventPublisher.publish
        wrapper = self

        def recorded_publish(self, topic, payload):
            if topic in ("spoold.job.progress", "spoold.job.completed", "spoold.job.validated"):
                with wrapper.lock:
                    wrapper.record(op="announce", topic=topic, job=payload.get("job"),
                                   done=payload.get("done"), step=wrapper.steps)
            return publish(self, topic, payload)

        EventPublisher.publish = recorded_publish


def main() -> int:
    Wrapper(json.loads(os.environ[ENV])).install()
    from spoold.cli import main as spoold_main

    return spoold_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
