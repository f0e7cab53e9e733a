"""The one runner for external tools: argv lists, a deadline, typed errors.

Every tool wrapper (lvm, qemuimg, iscsiadm, multipath, mount, sanlock, udev)
runs its commands through `run()`, or through a `Runner` it was given so tests
can swap in a fake. A command runs in its own process group; on timeout,
cancellation or any other error the whole group is killed and the child
reaped before the exception leaves `run()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from storage.errors import GeneralException, InvalidParameter, ResourceTimeout

log = logging.getLogger("storage.commands")

MiB = 1024 * 1024

# Per stream. qemu-img map of a large fragmented image or lvs of a big VG stay
# well below this; a tool that writes more is broken and gets killed.
DEFAULT_OUTPUT_LIMIT = 16 * MiB

# Between SIGTERM and SIGKILL to the process group.
KILL_GRACE = 2.0

REDACTED = "****"

_READ_SIZE = 64 * 1024
# A line callback never sees more than this; longer runs are split.
_MAX_LINE = 64 * 1024
# How many stderr lines str(CommandError) shows, and at most how many chars.
_ERR_TAIL_LINES = 5
_ERR_TAIL_CHARS = 1000

_LINE_SPLIT = re.compile(rb"[\r\n]")

# Killed commands that outlived SIGKILL, blocked on storage that does not
# answer; pruned once reaped. Process-wide by nature: it mirrors this
# process's children, which the kernel keeps per process too.
_lingering: dict[_Child, tuple[str, ...]] = {}

# Children are started from these threads, never from the event loop: a
# fork closes every open file in the child before it runs the new program,
# and the close of a file on hung FUSE storage (a file some thread of the
# agent has open at that moment) does not return until the storage answers,
# while the parent waits for the exec. Slow forks (a big process in a VM)
# do not stall the loop either. Threads stuck that way stay stuck; there are
# enough of them for every other command to go on.
_SPAWNERS = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                  thread_name_prefix="spawn")

# What a VM may be waiting on (a thin volume's lvextend while its writer
# nears the end of the LV) is started from threads of a higher CPU priority
# (`run(urgent=True)`): Linux keeps a nice value per thread, and a child
# starts with its parent thread's. On a host whose VMs keep the CPUs busy
# the agent's own thread and the lvm it starts otherwise wait their turn
# behind them: 0.18-0.27 s to start lvm under a full-speed writer in the lab
# guest against 10 ms idle. vdsmd runs at nice -20 altogether (its unit);
# here only these commands do, the agent's own work stays where the host put
# it. Not root (no CAP_SYS_NICE): the threads stay at the agent's priority.
URGENT_NICE = -10


def set_urgent_nice(nice: int) -> None:
    """The nice value of urgent commands (config thin.urgent_nice): before
    the first urgent command starts its spawner threads."""
    global URGENT_NICE
    URGENT_NICE = nice


def _raise_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(URGENT_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError as e:
        log.warning("Urgent commands start at the agent's own priority: %s", e)


_URGENT_SPAWNERS = concurrent.futures.ThreadPoolExecutor(
    max_workers=8, thread_name_prefix="spawn-urgent", initializer=_raise_priority)

LineCallback = Callable[[str], None]
ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did. `argv` is redacted; `out` and `err` are raw."""

    argv: tuple[str, ...]
    rc: int
    out: bytes
    err: bytes
    duration: float = 0.0

    @property
    def text(self) -> str:
        """stdout decoded (tools run with LC_ALL=C; bad bytes are replaced)."""
        return self.out.decode("utf-8", "replace")

    @property
    def err_text(self) -> str:
        return self.err.decode("utf-8", "replace")

    def lines(self) -> list[str]:
        """Non-empty stdout lines, stripped."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]


def _redact_str(value: str, redact: Sequence[str]) -> str:
    for secret in redact:
        if secret:
            value = value.replace(secret, REDACTED)
    return value


def _redact_bytes(value: bytes, redact: Sequence[str]) -> bytes:
    for secret in redact:
        if secret:
            value = value.replace(secret.encode("utf-8", "surrogateescape"),
                                  REDACTED.encode())
    return value


def redact_argv(argv: Sequence[str], redact: Sequence[str]) -> tuple[str, ...]:
    """argv with every occurrence of a secret replaced by `****`."""
    return tuple(_redact_str(arg, redact) for arg in argv)


def _tail(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    text = " | ".join(lines[-_ERR_TAIL_LINES:])
    if len(text) > _ERR_TAIL_CHARS:
        text = "..." + text[-_ERR_TAIL_CHARS:]
    return text


class CommandError(GeneralException):
    """A command exited with an rc its caller did not accept.

    `argv`, `out` and `err` are already redacted, so the error can be logged
    or shown as is. `rc_name` is the caller's name for the exit code, if it
    gave one (`run(..., rc_names={5: "no-such-vg"})`); wrappers branch on it
    or turn the error into a domain error.
    """

    template = "Command {cmd} failed ({status}): {stderr}"

    def __init__(self, argv: Sequence[str], rc: int, out: bytes, err: bytes, *,
                 rc_names: Mapping[int, str] | None = None,
                 redact: Sequence[str] = (),
                 stderr: str | None = None) -> None:
        self.argv = redact_argv(argv, redact)
        self.rc = rc
        self.out = _redact_bytes(out, redact)
        self.err = _redact_bytes(err, redact)
        self.rc_name = (rc_names or {}).get(rc)
        status = f"rc={rc}"
        if self.rc_name:
            status += f" {self.rc_name}"
        elif rc < 0:
            status += f" killed by {_signal_name(-rc)}"
        if stderr is None:
            # Some tools (iscsiadm, multipath) report errors on stdout.
            stderr = _tail(self.err) or _tail(self.out) or "no output"
        super().__init__(cmd=shlex.join(self.argv), rc=rc, status=status, stderr=stderr)

    @property
    def err_text(self) -> str:
        return self.err.decode("utf-8", "replace")


class CommandNotFound(CommandError):
    """The program could not be started (not installed, not executable)."""

    def __init__(self, argv: Sequence[str], reason: str, *, redact: Sequence[str] = ()) -> None:
        # 127 is what a shell reports for a missing program.
        super().__init__(argv, 127, b"", reason.encode(), redact=redact)


class CommandOutputTooLarge(CommandError):
    """The command wrote more than the limit to one stream and was killed."""

    def __init__(self, argv: Sequence[str], rc: int, out: bytes, err: bytes, *,
                 stream: str, limit: int, redact: Sequence[str] = ()) -> None:
        self.stream = stream
        self.limit = limit
        super().__init__(argv, rc, out, err, redact=redact,
                         stderr=f"more than {limit} bytes on {stream}; killed")


class CommandTimeout(ResourceTimeout):
    """The command did not finish in time; its process group was killed.

    A ResourceTimeout, so the RPC edge reports code 851.
    """

    def __init__(self, argv: Sequence[str], timeout: float, *,
                 redact: Sequence[str] = ()) -> None:
        self.argv = redact_argv(argv, redact)
        self.timeout = timeout
        cmd = shlex.join(self.argv)
        super().__init__(cmd=cmd, timeout=timeout,
                         reason=f"command {cmd} did not finish within {timeout:g} s")


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def check_arg(value: str, field: str) -> str:
    """Return `value` if it is safe as one argument of a command, else raise.

    For values that come from a request (path, iqn, mount option...): one
    starting with `-` would be read as an option, and a newline, CR or NUL can
    smuggle a second record into tools that read line based input.
    """
    if not isinstance(value, str):
        raise InvalidParameter(field=field, reason="must be a string")
    if not value:
        raise InvalidParameter(field=field, reason="must not be empty")
    if value.startswith("-"):
        raise InvalidParameter(field=field, reason="must not start with '-'")
    for char, name in (("\n", "newline"), ("\r", "carriage return"), ("\0", "NUL")):
        if char in value:
            raise InvalidParameter(field=field, reason=f"must not contain a {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\ud800"): exec() cannot encode it.
        raise InvalidParameter(field=field, reason="must be valid Unicode") from None
    return value


class Runner(Protocol):
    """The signature of `run()`. Wrappers take `runner: Runner = run`; tests
    pass a fake instead. A fake may be `async def fake(argv, **kwargs: Any)`."""

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        check: bool = True,
        ok_rcs: Collection[int] = (0,),
        rc_names: Mapping[int, str] | None = None,
        redact: Sequence[str] = (),
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        on_stdout_line: LineCallback | None = None,
        on_stderr_line: LineCallback | None = None,
        urgent: bool = False,
    ) -> CommandResult: ...


class _StreamFailed(Exception):
    """Raised inside a reader task to stop the command; run() replaces it."""


class _Collector:
    """Collects one output stream up to a limit and feeds a line callback.

    Lines are split on both "\\n" and "\\r": qemu-img -p rewrites its progress
    line with "\\r" and prints "\\n" only at the end.
    """

    def __init__(self, name: str, limit: int, on_line: LineCallback | None) -> None:
        self.name = name
        self.limit = limit
        self.on_line = on_line
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.callback_error: BaseException | None = None
        self._partial = b""

    def data(self) -> bytes:
        return b"".join(self.chunks)

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(_READ_SIZE):
            self._feed(chunk)
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _feed(self, chunk: bytes) -> None:
        room = self.limit - self.size
        if len(chunk) > room:
            self.chunks.append(chunk[:room])
            self.size += room
            self.overflow = True
            raise _StreamFailed(self.name)
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.on_line is None:
            return
        *lines, self._partial = _LINE_SPLIT.split(self._partial + chunk)
        for line in lines:
            self._emit(line)
        while len(self._partial) > _MAX_LINE:
            self._emit(self._partial[:_MAX_LINE])
            self._partial = self._partial[_MAX_LINE:]

    def _emit(self, line: bytes) -> None:
        if self.on_line is None or not line.strip():
            return
        try:
            self.on_line(line.decode("utf-8", "replace"))
        except Exception as e:
            # A broken callback stops the command; run() re-raises this error.
            self.callback_error = e
            raise _StreamFailed(self.name) from e


async def _write_input(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    if stream is None:
        return
    try:
        stream.write(data)
        await stream.drain()
        stream.close()
        await stream.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        # The tool exited or closed stdin without reading it all; its rc says
        # whether that was a failure.
        pass


class Child(Protocol):
    """A long-running child `start()` started: what its callers use (a fake
    in unit tests implements the same)."""

    pid: int
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    def close(self) -> None:
        """Close this end of its pipes (once it is gone)."""


class Spawner(Protocol):
    """The signature of `start()`. Modules that keep a child running take
    `spawner: Spawner = start`; tests pass a fake instead."""

    async def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                       stdin: bool = False, stdout: bool = False, stderr: bool = False,
                       line_limit: int = _READ_SIZE) -> Child: ...


class _Child:
    """A started command: its pipes as asyncio streams, its exit as a future
    (a pidfd on the event loop: no thread waits for it)."""

    def __init__(self, popen: subprocess.Popen[bytes], line_limit: int = _READ_SIZE) -> None:
        self.line_limit = line_limit
        self.popen = popen
        self.pid = popen.pid
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._transports: list[asyncio.BaseTransport] = []
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        self._on_exit()     # it may be gone already

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def _on_exit(self) -> None:
        if self._exited.done() or self.popen.poll() is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._exited.set_result(self.popen.returncode)

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self.popen.stdin is not None:
            wtransport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                self.popen.stdin)
            self.stdin = asyncio.StreamWriter(wtransport, protocol, None, loop)
            self._transports.append(wtransport)
        for name in ("stdout", "stderr"):
            pipe = getattr(self.popen, name)
            if pipe is None:
                continue
            reader = asyncio.StreamReader(limit=self.line_limit)
            rtransport, _ = await loop.connect_read_pipe(
                lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)   # type: ignore[misc]
            self._transports.append(rtransport)
            setattr(self, name, reader)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """SIGKILL the child's process group (it leads its own)."""
        _signal_group(self.pid, signal.SIGKILL)

    def close_pipes(self) -> None:
        for transport in self._transports:
            transport.close()

    def close(self) -> None:
        self.close_pipes()


def _kill_orphan(started: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """A child whose caller was cancelled while it was being started: killed,
    and reaped by a spawner thread."""
    if started.cancelled() or started.exception() is not None:
        return
    popen = started.result()
    _signal_group(popen.pid, signal.SIGKILL)
    _SPAWNERS.submit(popen.wait)


async def _spawn(argv: Sequence[str], *, stdin: int, env: dict[str, str],
                 cwd: str | os.PathLike[str] | None, stdout: int | None = subprocess.PIPE,
                 stderr: int | None = subprocess.PIPE, line_limit: int = _READ_SIZE,
                 urgent: bool = False, pass_fds: Sequence[int] = ()) -> _Child:
    loop = asyncio.get_running_loop()
    spawners = _URGENT_SPAWNERS if urgent else _SPAWNERS
    started = loop.run_in_executor(spawners, lambda: subprocess.Popen(
        list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env,
        cwd=cwd, start_new_session=True, close_fds=True, pass_fds=pass_fds))
    try:
        popen = await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_kill_orphan)
        raise
    child = _Child(popen, line_limit)
    try:
        await child.attach()
    except BaseException:
        _signal_group(popen.pid, signal.SIGKILL)
        child.close_pipes()
        raise
    return child


def _signal_group(pgid: int, signo: int) -> None:
    try:
        os.killpg(pgid, signo)
    except ProcessLookupError:
        pass


async def _terminate(proc: _Child) -> bool:
    """Kill the child's process group and reap the child; False if the child
    outlived SIGKILL by the grace period.

    SIGTERM first so a tool like lvm can release its locks, SIGKILL after the
    grace period. SIGKILL goes to the group even when the child died of
    SIGTERM: a grandchild may ignore SIGTERM and would be left an orphan.

    A child blocked on storage in an uninterruptible sleep (a request a FUSE
    server has read and does not answer) dies only when the storage answers:
    run() must not wait for that, its caller's deadline is gone. The event
    loop's child watcher reaps it whenever it dies.
    """
    pgid = proc.pid  # start_new_session: the child leads its own group
    _signal_group(pgid, signal.SIGTERM)
    try:
        try:
            async with asyncio.timeout(KILL_GRACE):
                await proc.wait()
        except TimeoutError:
            pass
        _signal_group(pgid, signal.SIGKILL)
        try:
            async with asyncio.timeout(KILL_GRACE):
                await proc.wait()
        except TimeoutError:
            log.warning("pid %d survived SIGKILL for %g s (blocked on storage?); "
                        "not waiting for it", proc.pid, KILL_GRACE)
            return False
        return True
    except asyncio.CancelledError:
        # Cancelled again while cleaning up: still never leave the group alive.
        # The event loop's child watcher reaps the child once it dies.
        _signal_group(pgid, signal.SIGKILL)
        raise


async def _discard_output(proc: _Child) -> None:
    """Read the pipes of a killed command to EOF so asyncio closes them.

    A process outside the group (a daemon that called setsid but kept our
    stdout) can hold a pipe open: after a short wait the transport is closed
    by force, through asyncio's private attribute (there is no public way).
    """
    streams = [s for s in (proc.stdout, proc.stderr) if s is not None]
    try:
        async with asyncio.timeout(KILL_GRACE):
            for stream in streams:
                while await stream.read(_READ_SIZE):
                    pass
    except TimeoutError:
        pass
    finally:
        if not all(s.at_eof() for s in streams):
            proc.close_pipes()


def lingering() -> list[tuple[int, tuple[str, ...]]]:
    """(pid, redacted argv) of commands run() gave up on that have not died
    yet: each waits on storage that does not answer (a FUSE request its
    server has read sleeps uninterruptibly). Callers avoid piling more
    commands onto the same storage."""
    for proc in [p for p in _lingering if p.returncode is not None]:
        del _lingering[proc]
    return [(p.pid, argv) for p, argv in _lingering.items()]


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    if env:
        merged.update(env)
    # Tools' messages and number formats are parsed; never localised.
    merged["LC_ALL"] = "C"
    return merged


async def start(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                stdin: bool = False, stdout: bool = False, stderr: bool = False,
                line_limit: int = _READ_SIZE, pass_fds: Sequence[int] = (),
                urgent: bool = False) -> Child:
    """Start a long-running child (a helper daemon, an export) off the event
    loop, as `run()` starts commands, in its own process group; the caller
    keeps it and must end it (`kill()`, then `wait()` and `close()`).
    `pass_fds` stay open in it; `urgent` as for run().

    A stream asked for is a pipe (stdout and stderr read with lines of up to
    `line_limit` bytes); else stdin and stdout are /dev/null and stderr is the
    agent's own (the journal).

    Started from a spawner thread: such a thread lives as long as the agent,
    so a child's PR_SET_PDEATHSIG (sent when the thread that forked it ends)
    still means "when the agent dies".
    """
    try:
        return await _spawn(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if stderr else None,
                            env=_child_env(env), cwd=None, line_limit=line_limit,
                            pass_fds=pass_fds, urgent=urgent)
    except (FileNotFoundError, PermissionError) as e:
        raise CommandNotFound(argv, f"cannot run {argv[0]}: {e.strerror}") from e


def _checked_argv(argv: Sequence[str], timeout: float) -> tuple[str, ...]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of arguments, not a string")
    if not argv:
        raise ValueError("argv is empty")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    return tuple(argv)


async def _kill(proc: _Child, shown: tuple[str, ...]) -> None:
    """Kill an interrupted command's process group; one that does not die
    (D state on hung storage) is left lingering, its pipes closed."""
    dead = False
    try:
        dead = await _terminate(proc)
    finally:
        if dead:
            await _discard_output(proc)
        else:
            # It still holds its pipes: close them now.
            proc.close_pipes()
            _lingering[proc] = shown


def _raise_stream_error(argv: Sequence[str], cmd: str, rc: int, out: _Collector,
                        err: _Collector, output_limit: int, redact: Sequence[str]) -> None:
    """What a killed command's output streams ended it with, raised: a line
    callback's error, or too much output."""
    for stream in (out, err):
        if stream.callback_error is not None:
            log.debug("%s: %s callback failed, killed", cmd, stream.name)
            raise stream.callback_error from None
        if stream.overflow:
            log.warning("%s: more than %d bytes on %s, killed", cmd, output_limit,
                        stream.name)
            raise CommandOutputTooLarge(argv, rc, out.data(), err.data(),
                                        stream=stream.name, limit=output_limit,
                                        redact=redact) from None


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    ok_rcs: Collection[int] = (0,),
    rc_names: Mapping[int, str] | None = None,
    redact: Sequence[str] = (),
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    on_stdout_line: LineCallback | None = None,
    on_stderr_line: LineCallback | None = None,
    urgent: bool = False,
) -> CommandResult:
    """Run `argv` (no shell) and return its result.

    timeout: seconds for the whole command, output included; then the process
        group is killed and CommandTimeout (a ResourceTimeout, 851) raised.
    input: bytes for stdin; without it stdin is /dev/null.
    env: added to the agent's environment; LC_ALL=C always wins.
    check: raise CommandError when rc is not in `ok_rcs`.
    rc_names: names for known exit codes, shown in the error as `rc_name`.
    redact: secrets (CHAP passwords...) replaced by `****` in the logged and
        raised argv, out and err. The returned result's out and err are raw.
    output_limit: bytes per stream; beyond it the command is killed and
        CommandOutputTooLarge raised.
    on_stdout_line, on_stderr_line: called with each non-empty line as it
        arrives (split on "\\n" and "\\r"); an exception from one kills the
        command and is re-raised.
    urgent: started at a higher CPU priority (URGENT_NICE): a VM waits on it.

    Cancelling the calling task kills the process group, reaps the child and
    re-raises CancelledError. After a normal exit the group is left alone
    (daemons call setsid anyway), but run() waits for EOF on stdout and
    stderr: a descendant that keeps them open counts against the timeout.
    """
    argv = _checked_argv(argv, timeout)
    shown = redact_argv(argv, redact)
    cmd = shlex.join(shown)

    began = time.monotonic()
    try:
        proc = await _spawn(argv, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                            env=_child_env(env), cwd=cwd, urgent=urgent)
    except (FileNotFoundError, PermissionError) as e:
        log.debug("%s: cannot start: %s", cmd, e.strerror)
        raise CommandNotFound(argv, f"cannot run {argv[0]}: {e.strerror}", redact=redact) from e

    log.debug("%s: started, pid %d", cmd, proc.pid)
    out = _Collector("stdout", output_limit, on_stdout_line)
    err = _Collector("stderr", output_limit, on_stderr_line)
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            async with asyncio.TaskGroup() as tasks:
                if input is not None:
                    tasks.create_task(_write_input(proc.stdin, input))
                tasks.create_task(out.drain(proc.stdout))
                tasks.create_task(err.drain(proc.stderr))
            rc = await proc.wait()
    except BaseException as e:
        await _kill(proc, shown)
        elapsed = time.monotonic() - began
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        if isinstance(e, TimeoutError) and deadline.expired():
            log.warning("%s: timed out after %.3f s, killed", cmd, elapsed)
            raise CommandTimeout(argv, timeout, redact=redact) from None
        _raise_stream_error(argv, cmd, rc, out, err, output_limit, redact)
        log.debug("%s: interrupted (%s) after %.3f s, killed", cmd, type(e).__name__, elapsed)
        raise

    elapsed = time.monotonic() - began
    log.debug("%s: rc=%d in %.3f s", cmd, rc, elapsed)
    result = CommandResult(shown, rc, out.data(), err.data(), elapsed)
    if check and rc not in ok_rcs:
        raise CommandError(argv, rc, result.out, result.err, rc_names=rc_names, redact=redact)
    return result


# qemu-img -p writes "    (12.34/100%)" and rewrites it with "\r".
_QEMU_PROGRESS = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")


def qemu_progress_parser(progress: ProgressCallback) -> LineCallback:
    """A line callback that feeds qemu-img -p percentages (0..100) to `progress`."""

    def on_line(line: str) -> None:
        for match in _QEMU_PROGRESS.finditer(line):
            progress(float(match.group(1)))

    return on_line


async def run_with_progress(
    argv: Sequence[str],
    *,
    timeout: float,
    progress: ProgressCallback,
    runner: Runner = run,
    **kwargs: Any,
) -> CommandResult:
    """Run a qemu-img command that was given `-p`, reporting its percentage.

    Other keyword arguments go to the runner unchanged.
    """
    return await runner(argv, timeout=timeout, on_stdout_line=qemu_progress_parser(progress),
                        **kwargs)
