"""Run the real hostagentd as a subprocess for tests (host tier and lab guest).

The agent runs in dev mode on a free loopback port with its own state dir.
Readiness is the systemd way: the test binds a NOTIFY_SOCKET and waits for
READY=1, so a test never sleeps and never races the listener.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rpc.client import Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(self, state_dir: Path, port: int | None = None,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._sock: socket.socket | None = None
        self._sock_dir: str | None = None
        self.log_path = self.state_dir.parent / f"agent-{self.port}.log"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "agent.daemon", "--dev",
                "--state-dir", str(self.state_dir), "--port", str(self.port),
                *self.extra_args]

    def start(self, timeout: float = 30.0, until: str = "READY=1") -> AgentProcess:
        """Start the agent and wait until it sends `until` (a line of a
        notification: READY=1 by default)."""
        # a restart waits for this process's READY=1, not the last one's
        self.notifications = []
        self._sock_dir = tempfile.mkdtemp(prefix="notify-")
        path = os.path.join(self._sock_dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        env = dict(os.environ)
        env.update(self.env)
        env["NOTIFY_SOCKET"] = path
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), env=env, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if not self.wait_notify(until, timeout):
            self.kill()
            raise RuntimeError(f"agent did not become ready ({until}) in {timeout}s; log:\n"
                               f"{self.log()}")
        return self

    def wait_notify(self, word: str, timeout: float) -> bool:
        """Wait until the agent sent a notification containing `word`."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while not any(word in n.split("\n") for n in self.notifications):
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                             and not self._drain()):
                return any(word in n.split("\n") for n in self.notifications)
            self._sock.settimeout(min(left, 0.2))
            try:
                self.notifications.append(self._sock.recv(4096).decode())
            except TimeoutError:
                pass
        return True

    def _drain(self) -> bool:
        assert self._sock is not None
        self._sock.settimeout(0)
        got = False
        try:
            while True:
                self.notifications.append(self._sock.recv(4096).decode())
                got = True
        except (BlockingIOError, TimeoutError):
            return got

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send `sig` and wait; returns the exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        rc = self.proc.returncode
        self._close()
        return rc

    def kill(self) -> None:
        """SIGKILL the agent (and anything left in its process group)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._drain()
            self._sock.close()
            self._sock = None
        if self._sock_dir is not None:
            for name in os.listdir(self._sock_dir):
                os.unlink(os.path.join(self._sock_dir, name))
            os.rmdir(self._sock_dir)
            self._sock_dir = None

    def client(self) -> Client:
        """An rpc.client.Client for this agent, with the dev client certificate."""
        from rpc.client import Client

        return Client.for_dev(self.state_dir, port=self.port)

    def tls(self) -> ssl.SSLContext:
        """A strictly verifying client context with the dev client certificate."""
        from rpc.client import client_ssl_context

        return client_ssl_context(self.pki / "ca.pem", self.pki / "client.pem",
                                  self.pki / "client.key")


@contextlib.contextmanager
def clean_agent(state_dir: Path) -> Iterator[AgentProcess]:
    """An agent for a module of hostile requests: it must stop cleanly
    (status 0) and never have logged a traceback, whatever it was sent."""
    proc = AgentProcess(state_dir).start()
    try:
        yield proc
    finally:
        rc = proc.stop()
    assert rc == 0, proc.log()
    assert "Traceback" not in proc.log_path.read_text(errors="replace")
