"""The README's walk-through, as a new user types it: its commands are read
from README.md (not copied here), run against a fresh `make run` agent (the
Makefile's own command line) in a terminal, and what the terminal shows is
checked against what the README says it shows.

Everything runs in a network namespace of its own, so the README's fixed
ports (54321, 54322) never clash with an agent someone runs on this machine.
Also here: the rest of the walk-through's rough edges (a missing
certificate file, two agents on one state directory, a clean stop)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import ROOT, AgentProcess
from tests.integration.crashharness import localfs_domains
from tests.integration.storagefixtures import wait_for

pytestmark = pytest.mark.root

ANY = "\x00any"
MORE = "\x00more"


# ---- the README ---------------------------------------------------------------------------

@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README.md has no section {title!r}"
    return m.group(1)


def walkthrough_steps(section: str) -> list[Step]:
    """`$ command` lines of the section's sh blocks, each with the lines
    shown after it (its output)."""
    steps: list[Step] = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:]))
            elif line.strip():
                assert steps, f"output before any command: {line!r}"
                steps[-1].expected.append(line)
    return steps


def template(text: str) -> Any:
    """The README's JSON with its elisions: `[...]` and "…" stand for any
    value, `, ...}` for more keys."""
    text = text.replace("[...]", json.dumps(ANY)).replace('"…"', json.dumps(ANY))
    text = re.sub(r",\s*\.\.\.\s*}", lambda _: f", {json.dumps(MORE)}: true}}", text)
    return json.loads(text)


def matches(tmpl: Any, value: Any) -> bool:
    if tmpl == ANY:
        return True
    if isinstance(tmpl, dict):
        if not isinstance(value, dict):
            return False
        keys = set(tmpl) - {MORE}
        if not keys <= set(value) or (MORE not in tmpl and set(value) != keys):
            return False
        return all(matches(tmpl[k], value[k]) for k in keys)
    if isinstance(tmpl, list):
        return (isinstance(value, list) and len(tmpl) == len(value)
                and all(matches(t, v) for t, v in zip(tmpl, value, strict=True)))
    return bool(tmpl == value)


# ---- a terminal -----------------------------------------------------------------------------

def screen(raw: bytes) -> list[str]:
    """The lines a terminal shows for raw output: \\r returns to the line's
    start and overwrites, ESC[K erases to its end."""
    lines: list[list[str]] = [[]]
    col = 0
    text = raw.decode(errors="replace").replace("\x1b[K", "\x00K")
    i = 0
    while i < len(text):
        ch = text[i]
        line = lines[-1]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        elif ch == "\x00" and text[i + 1:i + 2] == "K":
            del line[col:]
            i += 1
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    out = ["".join(chars).rstrip() for chars in lines]
    while out and not out[-1]:
        out.pop()
    return out


class Namespace:
    """A network namespace with its loopback up, kept by a sleeping process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c",
             "ip link set lo up && echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def argv(self, command: str) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-n", "bash", "-c", command]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Ran:
    rc: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def run_in_terminal(ns: Namespace, command: str, cwd: Path, timeout: float = 60) -> Ran:
    main, sub = pty.openpty()
    proc = subprocess.Popen(ns.argv(command), cwd=cwd, stdin=subprocess.DEVNULL, stdout=sub,
                            stderr=sub, env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    os.close(sub)
    raw = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{command!r} still running after {timeout} s:\n{raw!r}"
            ready, _, _ = select.select([main], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:    # EIO: every holder of the terminal closed it
                break
            if not chunk:
                break
            raw += chunk
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Ran(rc, screen(raw))


class Background:
    """A command started with `&`, ready when it sent READY=1 (as systemd
    learns it): no sleep, no polling of its port."""

    def __init__(self, ns: Namespace, command: str, cwd: Path, log: Path) -> None:
        self.sock_path = cwd / f".notify-{len(list(cwd.glob('.notify-*')))}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ns.argv(f"exec {command}"), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(self.sock_path)})

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, \
                f"not ready (rc {self.proc.poll()}):\n{self.log.read_text()}"
            self.sock.settimeout(min(left, 0.5))
            try:
                if "READY=1" in self.sock.recv(4096).decode().split("\n"):
                    return
            except TimeoutError:
                pass

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; the exit status (SIGKILL and an AssertionError if it hangs)."""
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"did not stop on SIGTERM:\n{self.log.read_text()}") \
                    from None
        return self.proc.returncode


@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace()
    yield n
    n.close()


def make_run_command() -> str:
    """The command line `make run` starts the agent with (the Makefile's own)."""
    out = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "run"], capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "bin/hostagentd" in line]
    assert len(lines) == 1, out
    return lines[0]


# ---- the walk-through -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_first_walkthrough_as_written(ns: Namespace, tmp_path: Path) -> None:
    steps = walkthrough_steps(readme_section("First walk-through"))
    assert len(steps) >= 6, steps
    work = tmp_path / "checkout"      # a fresh checkout's view: the venv, no var/
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    started: list[Background] = []
    try:
        agent = Background(ns, make_run_command(), work, tmp_path / "make-run.log")
        started.append(agent)
        agent.wait_ready()
        for step in steps:
            if step.command.rstrip().endswith("&"):
                bg = Background(ns, step.command.rstrip()[:-1], work,
                                tmp_path / f"bg{len(started)}.log")
                started.append(bg)
                bg.wait_ready()
                continue
            ran = run_in_terminal(ns, step.command, work)
            _check(step, ran)
    finally:
        rcs = [bg.stop() for bg in reversed(started)]
    assert rcs == [0] * len(started)
    for bg in started:
        log = bg.log.read_text()
        assert " ERROR " not in log and "Traceback" not in log, log


def _check(step: Step, ran: Ran) -> None:
    what = f"$ {step.command}\n{ran.text}"
    if not step.expected:
        # the README shows no output: the call works and prints JSON
        assert ran.rc == 0, what
        assert ran.lines, what
        json.loads(ran.text)
        return
    if step.expected[0].startswith("{"):
        tmpl = template("\n".join(step.expected))
        assert ran.rc == (1 if "error" in tmpl else 0), what
        assert matches(tmpl, json.loads(ran.text)), what
        return
    assert ran.rc == 0, what
    for line in step.expected:      # shown lines, each as a whole line
        assert line in ran.lines, what


def test_readme_walkthrough_parser_sees_the_progress_bar() -> None:
    """The README's bar line is an expected output the test checks (so a
    change of the README's layout cannot make the walk-through check empty)."""
    steps = walkthrough_steps(readme_section("First walk-through"))
    bars = [s for s in steps if "--wait" in s.command]
    assert bars and bars[0].expected == ["[" + "#" * 30 + "] 100% done"]


def test_terminal_emulation() -> None:
    assert screen(b"[##  ]  50% running\r[####] 100% done\n") == ["[####] 100% doneing"]
    assert screen(b"abc\r\x1b[Kx\r\n{}\r\n") == ["x", "{}"]


# ---- the rough edges around it ------------------------------------------------------------

def _client(state_dir: Path, *args: str,
            port: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "hostagent-client"), "--dev",
                           str(state_dir), *(["--port", str(port)] if port else []), *args],
                          capture_output=True, text=True, timeout=60)


def test_wait_on_a_verb_that_is_not_a_job_says_so(agent: AgentProcess) -> None:
    r = _client(agent.state_dir, "--wait", "ping", port=agent.port)
    assert r.returncode == 2, r
    assert "ping is not one" in r.stderr and "jobUUID" not in r.stderr, r.stderr
    r = _client(agent.state_dir, "--wait", "testStepJob", "steps=1", "stepSeconds=0",
                port=agent.port)
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["status"] == "done"


def test_missing_certificate_file_named_without_traceback(agent: AgentProcess,
                                                          tmp_path: Path) -> None:
    r = _client(tmp_path / "nothing-here", "ping", port=agent.port)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr, r.stderr
    assert f"cannot read {tmp_path}/nothing-here/pki/ca.pem: No such file" in r.stderr, r.stderr
    (agent.pki / "client.key").rename(tmp_path / "client.key")
    r = _client(agent.state_dir, "ping", port=agent.port)
    assert f"cannot read {agent.pki}/client.key: No such file" in r.stderr, r.stderr


def test_daemon_missing_certificate_file_named(tmp_path: Path) -> None:
    conf = tmp_path / "hostagent.toml"
    conf.write_text(f'[server]\nport = 1\ncert_file = "{tmp_path}/none.pem"\n'
                    f'[storage]\nstate_dir = "{tmp_path}/state"\n')
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "hostagentd"), "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    assert f"server.cert_file {tmp_path}/none.pem: No such file or directory" in r.stderr, \
        r.stderr


def test_second_agent_on_one_state_dir_exits(agent: AgentProcess, tmp_path: Path) -> None:
    second = AgentProcess(agent.state_dir)
    try:
        with pytest.raises(RuntimeError, match="did not become ready"):
            second.start(timeout=30)
    finally:
        second.kill()
    assert second.proc is not None and second.proc.returncode == 1
    assert (f"the state directory {agent.state_dir.resolve()} is in use by another agent "
            f"(pid {agent.proc.pid if agent.proc else '?'})") in second.log(), second.log()
    r = _client(agent.state_dir, "ping", port=agent.port)
    assert r.returncode == 0 and r.stdout.strip() == "{}", r
    # once the first has stopped, the directory is free again
    assert agent.stop() == 0
    third = AgentProcess(agent.state_dir).start()
    try:
        assert (agent.state_dir / "hostagentd.lock").read_text().strip() == \
            str(third.proc.pid if third.proc else "")
    finally:
        assert third.stop() == 0


async def test_clean_stop_logs_no_error(agent: AgentProcess, tmp_path: Path) -> None:
    """With a domain active, the lock holder runs; SIGTERM stops it all and
    nothing is logged as an error."""
    async with agent.client() as c:
        await localfs_domains(c, tmp_path, ["d1"])
    wait_for("the lock holder", lambda: "Lock holder started" in agent.log(), 30)
    assert agent.stop() == 0
    log = agent.log()
    assert "Lock holder" in log and " ERROR " not in log, log


def test_help_lists_enable_test_verbs() -> None:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "hostagentd"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert "--enable-test-verbs" in r.stdout, r.stdout
