import socket

import pytest

from spoold.notify import Notifier


@pytest.fixture
def systemd_socket(tmp_path, monkeypatch):
    """A datagram socket where systemd would listen, as NOTIFY_SOCKET names it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_a_field_with_a_newline_is_never_sent(systemd_socket):
    notifier = Notifier()
    notifier.send("READY=1", "STATUS=a\nWATCHDOG=trigger")
    assert systemd_socket.recv(4096) == b"READY=1"


def test_a_status_that_is_not_utf8_is_refused_not_raised(systemd_socket):
    notifier = Notifier()
    notifier.status("\udcff: 1/2 (50%)")  # a file name's undecodable byte, shown raw
    notifier.status("ok: 1/2 (50%)")
    assert systemd_socket.recv(4096) == b"STATUS=ok: 1/2 (50%)"


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.active
    notifier.send("STATUS=a\nb")  # nothing to send to, nothing raised
