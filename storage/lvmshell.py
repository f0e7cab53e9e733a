"""A running `lvm` shell for the LVM commands a VM waits on (issue 15).

Starting `lvm` is most of what a small LVM command costs on a busy host: in
the lab guest, under a writer at full speed, `lvm version` alone took
0.21-0.51 s, and an `lvextend` spawned for each extension 0.41-0.77 s
against 0.13-0.55 s for the same `lvextend` typed into an `lvm` shell
started once (tests/bench/thin.py; the probe in the session 8 note). So the
commands a writing VM waits on (a thin volume's lvextend, a refresh:
`urgent`) go to an `lvm` shell kept running, as lvmdbusd does, started at
commands.URGENT_NICE; a new volume's lvcreate, and the activation and
deactivation of LVs (prepareImage and teardownImage: a VM's start waits on
its chain's) go to a second one, at the agent's own priority (issue 21:
lvm's start was 0.29 of a 0.70 s create);
every other command is spawned as before (commands.run): reports (their
rows would come on the report descriptor) and what may ask a question.

The protocol (lvm2's own, the one lvmdbusd uses): `lvm` with no command
reads command lines on stdin; with LVM_COMMAND_PROFILE naming a profile
that sets `log/report_command_log=1` and JSON output (lvm2 ships
`lvmdbusd.profile` for this), each command ends with a JSON log report on
the file descriptor LVM_REPORT_FD, whose `shell` entry holds its return
code. A failed command's messages are asked with `lastlog`.

Each command line carries the same `--config` as a spawned command; the
shell rereads the VG from the devices for every command (as a spawned
command does); it keeps no LVM lock between commands. Only commands that
never ask a question go there (lvextend, a refresh, an lvcreate that does
not zero, lvchange --activate): the shell's stdin is the agent's next
command line, not /dev/null. One command at a time per shell: while it is busy (or cannot
say a command: quoting, too many arguments) the command is spawned, so one
VG's lvextend never waits behind another's, nor behind a create. A command
that times out or is cancelled kills its shell, as it would kill a spawned
lvm; the next command starts a new one. The shells end
with the agent (EOF on their stdin; `close()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

from storage import commands

log = logging.getLogger("storage.commands")

PROFILE = "lvmdbusd"
PROFILE_DIR = "/etc/lvm/profile"
# tools/lvm2cmdline.h MAX_ARGS; lvm_split() stops there
MAX_ARGS = 64
# lvm's return codes (tools/errors.h): ECMD_PROCESSED is success
ECMD_PROCESSED = 1
ECMD_FAILED = 5
_OUTPUT_LIMIT = 1 << 20
_READ = 64 * 1024

# The agent turns it on (config thin.lvm_shell) and closes the shell when it
# stops; off, the library spawns every command (no process outlives a call).
ENABLED = False


def set_enabled(enabled: bool) -> None:
    global ENABLED
    ENABLED = enabled


class ShellBroken(Exception):
    """The shell did not answer as lvm2's shell does (it ended, a report
    without a status): it is ended, the command's outcome is unknown."""


class CannotSay(ValueError):
    """An argument the shell's line splitter cannot carry (spawn instead)."""


def command_line(args: Sequence[str]) -> str:
    """`args` as one line for lvm_split(): an argument with white space or
    starting with a quote or '#' quoted with a quote it does not contain
    (the splitter knows no escapes)."""
    if len(args) >= MAX_ARGS:
        raise CannotSay(f"{len(args)} arguments")
    parts = []
    for arg in args:
        if not arg or any(c in arg for c in "\n\r\0"):
            raise CannotSay(f"argument {arg!r}")
        if not any(c.isspace() for c in arg) and arg[0] not in "'\"#":
            parts.append(arg)
            continue
        quote = next((q for q in "'\"" if q not in arg), None)
        if quote is None:
            raise CannotSay(f"argument {arg!r} has both quotes")
        parts.append(f"{quote}{arg}{quote}")
    return " ".join(parts)


def status(report: Mapping[str, Any]) -> int | None:
    """The return code in a command's log report (its `shell` status), or
    None if it has none."""
    for entry in reversed(report.get("log") or []):
        if entry.get("log_context") == "shell" and entry.get("log_type") == "status":
            try:
                return int(entry.get("log_ret_code", ""))
            except ValueError:
                return None
    return None


def errors(report: Mapping[str, Any]) -> str:
    """The error messages of a `lastlog` report, one per line."""
    return "\n".join(str(e.get("log_message", "")) for e in report.get("log") or []
                     if e.get("log_type") == "error")


class _Pump:
    """Reads one of the shell's streams as it comes (the shell must never
    block on a full pipe); keeps the last _OUTPUT_LIMIT bytes."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(_READ):
            self.data += chunk
            if len(self.data) > _OUTPUT_LIMIT:
                del self.data[:len(self.data) - _OUTPUT_LIMIT]
            self.changed.set()
        self.changed.set()      # EOF: the shell is gone

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class Shell:
    """One running `lvm` shell (see the module docstring)."""

    def __init__(self, tool: str = "lvm", env: Mapping[str, str] | None = None,
                 profile: str = PROFILE, profile_dir: str = PROFILE_DIR,
                 urgent: bool = False) -> None:
        self.tool = tool
        self.urgent = urgent
        self.env = dict(env or {})
        self.profile = profile
        self.profile_dir = profile_dir
        self.lock = asyncio.Lock()
        # looked at once, not on every command (a stat on the event loop)
        self.usable = os.path.exists(os.path.join(profile_dir, f"{profile}.profile"))
        self._child: commands.Child | None = None
        self._report_transport: asyncio.BaseTransport | None = None
        self._pumps: tuple[_Pump, _Pump, _Pump] | None = None   # report, stdout, stderr
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    async def _start(self) -> tuple[commands.Child, tuple[_Pump, _Pump, _Pump]]:
        if self._child is not None and self._pumps is not None \
                and self._child.returncode is None and not self._pumps[0].task.done():
            return self._child, self._pumps
        await self.close()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            env = {**self.env, "LVM_REPORT_FD": str(write_fd),
                   "LVM_COMMAND_PROFILE": self.profile,
                   # no readline history file written after every command
                   "HOME": "/nonexistent"}
            child = await commands.start([self.tool], env=env, stdin=True, stdout=True,
                                         stderr=True, pass_fds=(write_fd,),
                                         urgent=self.urgent)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        report = asyncio.StreamReader(limit=_READ)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(report), os.fdopen(read_fd, "rb", 0))
        assert child.stdout is not None and child.stderr is not None
        self._child, self._loop = child, loop
        self._pumps = (_Pump(report), _Pump(child.stdout), _Pump(child.stderr))
        self._report_transport = transport
        log.debug("lvm shell started, pid %d", child.pid)
        return child, self._pumps

    async def _ask(self, line: str) -> dict[str, Any]:
        """Send one command line; its JSON log report."""
        child, (report, _, _) = await self._start()
        assert child.stdin is not None
        child.stdin.write(line.encode() + b"\n")
        await child.stdin.drain()
        decoder = json.JSONDecoder()
        while True:
            text = report.data.decode("utf-8", "replace").strip()
            if text.endswith("}"):
                try:
                    value, end = decoder.raw_decode(text)
                except ValueError:
                    pass
                else:
                    if text[end:].strip() or not isinstance(value, dict):
                        raise ShellBroken(f"not one report: {text[:200]!r}")
                    report.data.clear()
                    return value
            if report.task.done():
                raise ShellBroken(f"it ended (rc={child.returncode})")
            report.changed.clear()
            await report.changed.wait()

    async def run(self, argv: Sequence[str], *, timeout: float,
                  rc_names: Mapping[int, str] | None = None) -> commands.CommandResult:
        """Run `argv` (["lvm", op, args...]) in the shell as commands.run
        would: CommandError for a failure, CommandTimeout after `timeout`.
        CannotSay: spawn it instead. The caller holds `lock`."""
        argv = tuple(argv)
        line = command_line(argv[1:])
        cmd = shlex.join(argv)
        began = time.monotonic()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                pid = (await self._start())[0].pid
                log.debug("%s: started, in the lvm shell (pid %d)", cmd, pid)
                code = status(await self._ask(line))
                assert self._pumps is not None
                out, err = self._pumps[1].take(), self._pumps[2].take()
                if code is None:
                    raise ShellBroken("no status in the report")
                rc = 0 if code == ECMD_PROCESSED else code
                if rc:
                    err += errors(await self._ask("lastlog")).encode()
                    self._pumps[1].take()
        except BaseException as e:
            await self.close(interrupt=True)
            if isinstance(e, ShellBroken):
                # done or not: unknown, as for a spawned lvm that was killed
                log.warning("%s: the lvm shell failed after %.3f s: %s", cmd,
                            time.monotonic() - began, e)
                raise commands.CommandError(argv, -1, b"", f"lvm shell: {e}".encode(),
                                            rc_names=rc_names) from None
            if isinstance(e, TimeoutError) and deadline.expired():
                log.warning("%s: timed out in the lvm shell after %.3f s, shell killed", cmd,
                            time.monotonic() - began)
                raise commands.CommandTimeout(list(argv), timeout) from None
            raise
        elapsed = time.monotonic() - began
        log.debug("%s: rc=%d in %.3f s", cmd, rc, elapsed)
        if rc:
            raise commands.CommandError(argv, rc, out, err, rc_names=rc_names)
        return commands.CommandResult(argv, rc, out, err, elapsed)

    async def close(self, *, interrupt: bool = False) -> None:
        """End the shell: EOF on its stdin; `interrupt` (a command in it was
        cut off): SIGTERM to its group, as commands.run ends a spawned
        command. SIGKILL if it is not gone after KILL_GRACE; one blocked on
        storage is not waited for longer."""
        child, pumps, self._child, self._pumps = self._child, self._pumps, None, None
        if child is None:
            return
        if self._loop is not asyncio.get_running_loop():
            # started on another event loop (tests): only the process can go
            child.kill()
            return
        with contextlib.suppress(OSError, RuntimeError):
            if interrupt:
                os.killpg(child.pid, signal.SIGTERM)
            elif child.stdin is not None:
                child.stdin.close()
        try:
            async with asyncio.timeout(commands.KILL_GRACE):
                await child.wait()
        except TimeoutError:
            child.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(commands.KILL_GRACE):
                    await child.wait()
        finally:
            if pumps is not None:
                for p in pumps:
                    p.task.cancel()
            if self._report_transport is not None:
                self._report_transport.close()
                self._report_transport = None
            child.close()


# one shell per priority: a VM's extension never waits behind a create
_SHELLS: dict[bool, Shell] = {}


async def run(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
              rc_names: Mapping[int, str] | None = None, urgent: bool = False,
              **kwargs: Any) -> commands.CommandResult:
    """A commands.Runner for lvm commands that never ask a question: in the
    shell of their priority (`urgent`: started at commands.URGENT_NICE)
    when it is free and on, else spawned by commands.run."""
    if ENABLED and not kwargs:
        shell = _SHELLS.get(urgent)
        if shell is None or shell._loop not in (None, asyncio.get_running_loop()):
            if shell is not None:
                await shell.close()
            shell = _SHELLS[urgent] = Shell(argv[0], env, urgent=urgent)
        if shell.usable and not shell.lock.locked():
            async with shell.lock:
                with contextlib.suppress(CannotSay):
                    return await shell.run(argv, timeout=timeout, rc_names=rc_names)
    return await commands.run(argv, timeout=timeout, env=env, rc_names=rc_names,
                              urgent=urgent, **kwargs)


async def close() -> None:
    """End the shells (the agent stopping)."""
    shells = list(_SHELLS.values())
    _SHELLS.clear()
    for shell in shells:
        await shell.close()
