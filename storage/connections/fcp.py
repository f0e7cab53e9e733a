"""FC connections: nothing to log in to. Connecting rescans the FC hosts so
new LUNs appear and lets multipath map them; the LUNs are then listed by
getDeviceList like iSCSI ones. All FC connections of a host are one target
(the host's fabric), so a second fcp connection id is a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import commands, multipath, udev
from storage.connections.base import Connection

log = logging.getLogger("storage.connections.fcp")


class FcpBackend:
    def __init__(self, *, scan_timeout: float = 120.0, command_timeout: float = 30.0,
                 runner: commands.Runner = commands.run, sysfs: Path = udev.SYSFS) -> None:
        self.scan_timeout = scan_timeout
        self.command_timeout = command_timeout
        self.runner = runner
        self.sysfs = sysfs

    def target_key(self, params: dict[str, Any]) -> str:
        return "fcp"

    def local_path(self, conn: Connection) -> Path | None:
        return None

    def _hosts(self) -> list[str]:
        # Only FC hosts: scanning an iSCSI host here could bring back a disk
        # an iSCSI disconnect has just removed (that backend scans its own).
        return udev.scsi_hosts(self.sysfs, kind="fc_host")

    async def connect(self, conn: Connection, save: Callable[[], None]) -> None:
        hosts = await asyncio.to_thread(self._hosts)
        await asyncio.gather(*(udev.scan_host(h, timeout=self.scan_timeout, sysfs=self.sysfs)
                               for h in hosts))
        if hosts and await multipath.is_running(timeout=self.command_timeout,
                                                runner=self.runner):
            await multipath.reload(timeout=self.scan_timeout, runner=self.runner)
        conn.owned = {"details": {"hosts": hosts}}
        log.info("FC connection %s: scanned %d FC host(s)", conn.id, len(hosts))

    async def disconnect(self, conn: Connection) -> None:
        """Nothing to undo: FC LUNs stay visible while the fabric zones them."""

    async def check(self, conn: Connection) -> None:
        """Nothing can be lost on this host's side."""

    async def test(self, params: dict[str, Any]) -> dict[str, Any]:
        hosts = await asyncio.to_thread(self._hosts)
        if not hosts:
            return {"reachable": False, "message": "this host has no FC HBA",
                    "details": {"hosts": []}}
        return {"reachable": True, "message": f"{len(hosts)} FC host(s)",
                "details": {"hosts": hosts}}
