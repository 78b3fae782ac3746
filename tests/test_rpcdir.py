"""vLLM's unix sockets go in a directory of each engine's own, removed after it, or by the next engine
start when a kill -9 left it."""

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from spoold.rpcdir import private_rpc_dir, remove_dead_rpc_dirs

from .helpers import REPO


@pytest.fixture
def short_dir():
    """A directory with a short path, as /tmp is: a unix socket's whole path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rpc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bind_as_vllm_does(base: str) -> None:
    """Leave a unix socket where vLLM makes its ZeroMQ ipc sockets (and leaves them)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{base}/{uuid.uuid4()}")
    listener.close()


@pytest.mark.parametrize("operator_set", [False, True])
def test_an_engine_keeps_its_sockets_in_a_directory_of_its_own_removed_after(short_dir, monkeypatch, operator_set):
    """vLLM leaves seven unix sockets in VLLM_RPC_BASE_PATH per engine start; a daemon swapping models
    for weeks must not fill /tmp (or the directory an operator named) with them."""
    from vllm import envs

    if operator_set:
        monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(short_dir))
    else:
        monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
        monkeypatch.setenv("TMPDIR", str(short_dir))
        monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    with private_rpc_dir() as path:
        assert envs.VLLM_RPC_BASE_PATH == path and os.path.dirname(path) == str(short_dir)
        bind_as_vllm_does(envs.VLLM_RPC_BASE_PATH)
    assert list(short_dir.iterdir()) == []
    assert os.environ.get("VLLM_RPC_BASE_PATH") == (str(short_dir) if operator_set else None)


def test_a_base_too_long_for_a_directory_of_our_own_is_used_as_it_is(short_dir, monkeypatch):
    from vllm import envs

    base = short_dir / ("b" * (106 - 37 - len(str(short_dir))))  # vLLM's own names just fit
    base.mkdir()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(base))
    with private_rpc_dir() as path:
        assert path == envs.VLLM_RPC_BASE_PATH == str(base)
        bind_as_vllm_does(path)  # binds: the engine starts, as it would without spoold
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(base)


def test_a_daemon_killed_with_kill_9_leaves_its_sockets_and_the_next_engine_start_removes_them(short_dir, monkeypatch):
    """kill -9 runs no clean-up: without the sweep each killed daemon left seven sockets for good."""
    engine = ("import socket, time, uuid\n"
              "from spoold.rpcdir import private_rpc_dir\n"
              "with private_rpc_dir() as path:\n"
              "    listener = socket.socket(socket.AF_UNIX)\n"
              "    listener.bind(f'{path}/{uuid.uuid4()}')\n"
              "    listener.listen()\n"
              "    print(path, flush=True)\n"
              "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_RPC_BASE_PATH=str(short_dir))
    daemon = subprocess.Popen([sys.executable, "-c", engine], env=env, stdout=subprocess.PIPE, text=True)
    try:
        theirs = daemon.stdout.readline().strip()
        assert theirs, "the stand-in daemon did not start"
        assert remove_dead_rpc_dirs(str(short_dir)) == 0 and os.listdir(theirs)  # alive: its sockets stay
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    assert os.listdir(short_dir) == [os.path.basename(theirs)]
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(short_dir))
    with private_rpc_dir() as ours:
        assert os.listdir(short_dir) == [os.path.basename(ours)]


def made(parent: Path, name: str, sockets: int = 1, files: tuple[str, ...] = ()) -> Path:
    path = parent / name
    path.mkdir()
    for _ in range(sockets):
        bind_as_vllm_does(str(path))
    for file in files:
        (path / file).write_text("not spoold's")
    return path


def test_only_the_socket_directories_of_dead_engines_are_removed(short_dir):
    made(short_dir, "spoold-rpc-abcd1234", sockets=7)  # a killed daemon's
    made(short_dir, "spoold-rpc-a_b_c_d_", sockets=0)  # one killed before vLLM made any
    live = made(short_dir, "spoold-rpc-live1234")  # a running engine's
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    kept = {live.name,
            made(short_dir, "spoold-rpc-withfile", files=("notes.txt",)).name,  # something of someone's in it
            made(short_dir, "spoold-rpc-backups-2026").name, made(short_dir, "spoold-abcd1234").name}  # not names of ours
    os.symlink(made(short_dir, "elsewhere", sockets=7), short_dir / "spoold-rpc-symlink1")
    kept |= {"elsewhere", "spoold-rpc-symlink1"}
    try:
        assert remove_dead_rpc_dirs(str(short_dir)) == 2
        assert set(os.listdir(short_dir)) == kept and len(os.listdir(short_dir / "elsewhere")) == 7
    finally:
        os.close(held)


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory of another owner needs root")
def test_another_users_socket_directory_is_never_removed(short_dir):
    theirs = made(short_dir, "spoold-rpc-theirs12")
    os.chown(theirs, 65534, 65534)
    assert remove_dead_rpc_dirs(str(short_dir)) == 0 and os.listdir(theirs)


def test_a_directory_another_daemon_sweeps_before_it_is_locked_is_made_again(short_dir, monkeypatch):
    """Just made, a directory is empty and unlocked, as a dead engine's is: another daemon's engine
    start may remove it in that moment, and vLLM must not be sent to bind in a directory that is gone."""
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(short_dir))
    flock, swept = fcntl.flock, []

    def swept_first(fd, operation):
        if not swept:
            swept.append(os.readlink(f"/proc/self/fd/{fd}"))
            assert remove_dead_rpc_dirs(str(short_dir)) == 1  # the other daemon's sweep
        return flock(fd, operation)
    monkeypatch.setattr(fcntl, "flock", swept_first)
    with private_rpc_dir() as path:
        assert path != swept[0] and os.listdir(short_dir) == [os.path.basename(path)]
        bind_as_vllm_does(path)
