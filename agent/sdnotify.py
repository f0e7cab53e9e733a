"""systemd notification protocol, spoken directly over NOTIFY_SOCKET.

READY=1 once every listener is bound, STOPPING=1 on shutdown, WATCHDOG=1
pings at half of WATCHDOG_USEC. The pings are sent from the event loop, so a
blocked loop stops them and systemd restarts the agent: that is the point.
While the agent starts (connections checked, domains activated, interrupted
jobs recovered: each bounded by storage deadlines, together sometimes more
than systemd's start timeout), EXTEND_TIMEOUT_USEC keeps systemd waiting,
again from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("agent.sdnotify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(data, self.address)
        except OSError as e:
            log.warning("Cannot notify systemd (%s): %s", lines, e)

    async def extend_start(self, interval: float = 20.0) -> None:
        """Until cancelled (the start has ended), ask systemd every `interval`
        for three more of them before its start timeout; a loop that
        stops sending lets the timeout come. Returns at once when not enabled."""
        if not self.address:
            return
        while True:
            self.notify(f"EXTEND_TIMEOUT_USEC={int(3 * interval * 1e6)}",
                        "STATUS=starting: storage connections, domains, interrupted jobs")
            await asyncio.sleep(interval)

    async def watchdog(self) -> None:
        """Ping the watchdog until cancelled; returns at once when not enabled."""
        if not self.watchdog_usec:
            return
        interval = self.watchdog_usec / 2e6
        log.info("Watchdog enabled, pinging every %.1f s", interval)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
