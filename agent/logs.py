"""Logging with the request id or job id on every line.

The ids live in context variables, so every log call made while serving a
request (or running a job), however deep, carries them without passing them
around.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Mapping

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        parts = []
        rid = request_id.get()
        if rid:
            parts.append(f"req={rid}")
        jid = job_id.get()
        if jid:
            parts.append(f"job={jid}")
        record.ctx = " ".join(parts) or "-"
        return True


def setup(level: str = "INFO", levels: Mapping[str, str] | None = None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM) the journal adds the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s [%(ctx)s] %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s [%(ctx)s] %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, lvl in (levels or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())
    # aiohttp's access log would log every request at INFO: keep it for DEBUG.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
