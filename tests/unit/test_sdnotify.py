import asyncio
import os
import socket

from agent.sdnotify import Notifier
from tests.polling import until


def received(s: socket.socket, into: list[bytes]) -> list[bytes]:
    """`into`, with what the non-blocking socket `s` holds appended."""
    while True:
        try:
            into.append(s.recv(200))
        except BlockingIOError:
            return into


def test_notify_reaches_socket(tmp_path):
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        Notifier({"NOTIFY_SOCKET": path}).notify("READY=1", "STATUS=ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"


def test_abstract_socket():
    name = f"hostagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("STOPPING=1")
        assert s.recv(100) == b"STOPPING=1"


def test_disabled_without_socket():
    n = Notifier({})
    assert not n.enabled
    n.notify("READY=1")  # no error


async def test_watchdog_pings(tmp_path):
    path = str(tmp_path / "w.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.setblocking(False)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
        task = asyncio.create_task(n.watchdog())
        pings: list[bytes] = []
        # every 0.05 s: a deadline of 1 s still catches a wrong interval
        await until(lambda: received(s, pings).count(b"WATCHDOG=1") >= 3,
                    "three watchdog pings", timeout=1.0)
        task.cancel()
        await asyncio.wait([task])
        assert pings.count(b"WATCHDOG=1") >= 3


def test_watchdog_for_another_pid_is_ignored():
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_usec == 0


async def test_a_long_start_extends_the_start_timeout(tmp_path):
    """While the agent starts, systemd is asked for more time every
    interval (three intervals each), until the start ends."""
    path = str(tmp_path / "e.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.setblocking(False)
        task = asyncio.create_task(Notifier({"NOTIFY_SOCKET": path}).extend_start(0.05))
        got: list[bytes] = []
        await until(lambda: len(received(s, got)) >= 2, "two extensions", timeout=1.0)
        task.cancel()
        await asyncio.wait([task])
        assert got[0].split(b"\n")[0] == b"EXTEND_TIMEOUT_USEC=150000", got
        assert await Notifier({}).extend_start() is None     # not under systemd: nothing
