"""This host: its persistent id, capabilities and statistics."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from agent import __version__
from storage.fileio import StateDamaged, atomic_write

API_VERSION = 1
DOM_TYPES = ("nfs", "posixfs", "localfs", "iscsi", "fcp")


class Host:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.host_id = ""
        self.started = time.monotonic()     # the uptime does not jump with the wall clock
        self._process = psutil.Process()
        # The first cpu_percent(None) call only starts the measurement.
        psutil.cpu_percent(None)
        self._process.cpu_percent(None)

    def load(self) -> None:
        """Read the host id, creating it on first start; it never changes
        after (StateDamaged if its record is not one: a new id would make
        this host another one to the engine)."""
        path = self.state_dir / "host_id"
        try:
            self.host_id = str(uuid.UUID(path.read_text().strip()))
        except FileNotFoundError:
            self.host_id = str(uuid.uuid4())
            atomic_write(path, (self.host_id + "\n").encode())
        except ValueError as e:        # not UTF-8, or not a UUID
            raise StateDamaged(path, "this host's id", str(e)) from None

    def capabilities(self, features: list[str]) -> dict[str, Any]:
        return {"version": __version__, "apiVersion": API_VERSION,
                "domTypes": list(DOM_TYPES), "features": sorted(features),
                "hostId": self.host_id}

    def stats(self) -> dict[str, Any]:
        """Host and agent figures; psutil reads /proc, which never blocks on storage."""
        mem = psutil.virtual_memory()
        load1, load5, load15 = os.getloadavg()
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            fds = self._process.num_fds()
            threads = self._process.num_threads()
            cpu = self._process.cpu_percent(None)
        return {
            "cpu": {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(None),
                    "load": [load1, load5, load15]},
            "memory": {"total": mem.total, "available": mem.available, "used": mem.used,
                       "percent": mem.percent},
            "agent": {"pid": os.getpid(), "rss": rss, "fds": fds, "threads": threads,
                      "cpuPercent": cpu, "uptime": time.monotonic() - self.started},
        }
