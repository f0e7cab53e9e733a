"""kill -9 trials for the agent's long verbs (issue 10): start a job, SIGKILL
the agent at a random point of it, restart it on the same state dir, check
what storage and the API show; and the invariant checks the trials share.
`kill_after_done` is the other mode: several jobs at once, the agent killed
the instant one is first seen done (issue 22): a job seen done stays done.

A kill takes the agent and every command it runs (qemu-img, qemu-nbd: each
in its own session, so a kill of the agent's process group misses them), as
a host crash does, and as systemd does before it restarts a crashed service
(what is left of the unit gets SIGKILL; systemd/hostagent.service): the
restarted agent never races a command of its predecessor, and a command
cut halfway leaves what it leaves (a qcow2 bitmap flagged in-use, leaked
clusters).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from rpc.client import Client, RpcError
from storage.metadata import MetadataError, VolumeMetadata
from tests.agentproc import AgentProcess

MiB = 1024**2
TRIALS = 20
ENDED = ("done", "failed", "aborted")
JOB_INTERRUPTED = 2106


def new_id() -> str:
    return str(uuid.uuid4())


# ---- storage as qemu and the file system see it ---------------------------------------


def qemu_info(path: Path, chain: bool = False) -> list[dict[str, Any]]:
    """`qemu-img info` of path (and its backing chain), top first."""
    argv = ["qemu-img", "info", "--output", "json", "-U", str(path)]
    if chain:
        argv.insert(-1, "--backing-chain")
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return out if chain else [out]


def digest(path: Path) -> str:
    """sha256 of what a VM sees of the volume at path (its chain collapsed)."""
    fmt = qemu_info(path)[0]["format"]
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        raw = Path(tmp) / "raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path),
                        str(raw)], check=True, capture_output=True)
        with open(raw, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
    return h.hexdigest()


def bitmaps(path: Path) -> list[dict[str, Any]]:
    """The persistent dirty bitmaps of a qcow2 image, with their flags."""
    specific = qemu_info(path)[0].get("format-specific", {})
    return list(specific.get("data", {}).get("bitmaps", [])) if specific.get(
        "type") == "qcow2" else []


def storage_files(root: Path) -> set[str]:
    return {str(p.relative_to(root / "images")) for p in (root / "images").rglob("*")}


def storage_state(roots: Sequence[Path]) -> dict[str, tuple[int, int]]:
    """Every file and directory under the domains' images/, with size and
    mtime: any change a job made there shows."""
    state = {}
    for root in roots:
        for p in (root / "images").rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                state[str(p)] = (st.st_size, st.st_mtime_ns)
    return state


def volume_md(root: Path, img: str, vol: str) -> VolumeMetadata | None:
    """A file domain volume's metadata as on storage (read with the agent dead)."""
    try:
        return VolumeMetadata.decode((root / "images" / img / f"{vol}.meta").read_bytes())
    except (FileNotFoundError, MetadataError):
        return None


def qemu_check(path: Path) -> bool:
    """`qemu-img check` of a qcow2 volume: asserts it is not corrupt; returns
    whether it leaked clusters (what a killed qemu-img that allocated them
    leaves: space lost, no data)."""
    r = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", str(path)],
                       capture_output=True, text=True)
    # rc 3: leaked clusters only; 2: corruption; 1: cannot check
    assert r.returncode in (0, 3), (path, r.stdout, r.stderr)
    return r.returncode == 3


async def check_invariants(c: Client, sd: str, root: Path, *, deep: bool = False,
                           leaked: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every listed volume is LEGAL, complete (qemu-img reads it with the
    recorded size) and its chain is whole; with `deep`, every qcow2 volume
    also passes `qemu_check` (those with leaked clusters are added to
    `leaked`). Storage holds exactly the files of the listed volumes (data,
    metadata and, where one was made, lease).
    Returns the listed volumes' infos by volume id."""
    infos = {}
    expected = set()
    for img in await c.call("getImagesList", sdUUID=sd):
        expected.add(img)
        for vol in await c.call("getVolumesList", sdUUID=sd, imgUUID=img):
            info = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
            assert info["legality"] == "LEGAL", info
            path = root / "images" / img / vol
            q = qemu_info(path, chain=True)
            assert q[0]["virtual-size"] == info["capacity"], (q[0], info)
            if deep and info["format"] == "cow" and qemu_check(path) and leaked is not None:
                leaked.add(vol)
            infos[vol] = info
            expected |= {f"{img}/{vol}", f"{img}/{vol}.meta"}
            if (root / "images" / img / f"{vol}.lease").exists():
                expected.add(f"{img}/{vol}.lease")
    files = storage_files(root)
    assert files == expected, {"not listed": sorted(files - expected),
                               "missing": sorted(expected - files)}
    return infos


# ---- domains ------------------------------------------------------------------------------


@dataclass
class Domains:
    """localfs domains made for a test, each in its own directory."""

    conns: list[dict[str, str]]
    sds: list[str]
    roots: list[Path]

    async def release(self, c: Client) -> None:
        for sd, conn in zip(self.sds, self.conns, strict=True):
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])


async def localfs_domains(c: Client, base: Path, names: Sequence[str],
                          dom_class: Sequence[str] | None = None) -> Domains:
    """A localfs domain (no OVF store) in directory base/name for each name;
    `dom_class` gives each one's class (data by default)."""
    out = Domains([], [], [])
    for i, name in enumerate(names):
        d = base / name
        d.mkdir()
        conn = {"id": new_id(), "connection": str(d)}
        await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
        sd = new_id()
        info = await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name=name,
                            domClass=dom_class[i] if dom_class else "data",
                            connectionId=conn["id"], ovfStore=False)
        out.conns.append(conn)
        out.sds.append(sd)
        out.roots.append(Path(info["path"]))
    return out


async def run_job(c: Client, verb: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
    """Run a job to its end; its final info."""
    job = new_id()
    await c.call(verb, jobUUID=job, **params)
    return await c.wait_job(job, timeout=timeout, poll=0.5)


async def done(c: Client, verb: str, **params: Any) -> Any:
    info = await run_job(c, verb, **params)
    assert info["status"] == "done", info
    return info.get("result")


# ---- the kill -----------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(proc.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def running(agent: AgentProcess, *argv: str) -> bool:
    """Whether the agent runs a command with these first arguments."""
    if agent.proc is None:
        return False
    return any(_argv(pid)[:len(argv)] == list(argv) for pid in descendants(agent.proc.pid))


def held(agent: AgentProcess, argv: Sequence[str], until: Callable[[], bool] | None = None,
         *, step: float = 0.0003, steps: int = 1000) -> bool:
    """Catch a command of the agent's that lasts a few ms, shorter than a
    look at its processes: stop it (SIGSTOP) the moment it is seen, then let
    it run in slices of `step` seconds until `until()` holds. True with the
    command stopped there, for `kill_tree` to kill; false (the command let
    go) if it is not running, ends first, or never gets there."""
    if agent.proc is None:
        return False
    pid = next((p for p in descendants(agent.proc.pid)
                if _argv(p)[:len(argv)] == list(argv)), None)
    if pid is None or not _stop(pid):
        return False
    for _ in range(steps):
        if until is None or until():
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(step)
        if not _stop(pid):
            return False
    os.kill(pid, signal.SIGCONT)
    return False


def _stop(pid: int) -> bool:
    """SIGSTOP pid and see it stopped; false if it ended first (a process
    already inside exit cannot stop)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("T", "t"):
            return True
        if state in ("Z", "X"):
            return False
        time.sleep(0.0001)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_tree(agent: AgentProcess, timeout: float = 10.0) -> list[str]:
    """SIGKILL the agent and every process it started; returns the commands
    that were running ("qemu-img commit"). Stopped first, the agent starts
    nothing more and does not see its commands die."""
    assert agent.proc is not None and agent.proc.poll() is None, "the agent is not running"
    os.kill(agent.proc.pid, signal.SIGSTOP)
    doomed = descendants(agent.proc.pid)
    names = [" ".join([Path(a[0]).name, *a[1:2]]) for a in map(_argv, doomed) if a and a[0]]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.kill()
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in doomed):
        assert time.monotonic() < deadline, f"commands of the killed agent live on: {names}"
        time.sleep(0.01)
    return names


def job_status(agent: AgentProcess, job: str) -> tuple[str | None, dict[str, Any] | None]:
    """(status, error) of a job as its record on disk says: what a restart finds."""
    try:
        record = json.loads((agent.state_dir / "jobs" / f"{job}.json").read_text())
    except FileNotFoundError:
        return None, None
    return record["status"], record.get("error")


# ---- the trials ---------------------------------------------------------------------------


@dataclass
class Aim:
    """Aim a trial's kill at a step of the job that timing alone seldom
    hits (short, or late in a job whose length varies): kill at a random
    point up to `within` seconds after `ready()` turns true, polled with the
    agent running (the kill comes anyway if it never does)."""

    step: str
    ready: Callable[[], bool]
    within: float


@dataclass
class Job:
    """One trial's job: what to submit, and which domains it may change."""

    verb: str
    params: dict[str, Any]
    roots: Sequence[Path]
    data: Any = None                 # the test's own
    aim: Aim | None = None
    uuid: str = field(default_factory=new_id)


@dataclass
class Kill:
    """Where a kill landed. stage: `before` (nothing on the domains changed
    yet), `inside` (changed, the job not recorded as ended), `after` (the
    record says the job ended), `uncut` (the calibration run: no kill)."""

    delay: float
    stage: str
    phase: str | None = None         # the test's finer stage, inside only
    commands: list[str] = field(default_factory=list)   # killed with the agent


Start = Callable[[Client], Awaitable[Job]]
Check = Callable[[Client, Job, Kill], Awaitable[str]]
Phase = Callable[[Job], str]


class CrashTrials:
    """kill -9 trials of one verb against one agent.

    Each trial: `start(c)` prepares and returns a Job; the harness submits
    it, kills the agent `delay` seconds after the call (or where the job's
    `aim` says), sees where the kill
    landed (from storage and the job record, with the agent dead), restarts
    the agent (`agent_factory(state_dir, port=...)`) and calls
    `check(c, job, kill)`, which asserts the invariants and returns the
    outcome's name.

    Kill points count from the job's call. One uncut run first measures
    how long the job takes (`span`; it grows when a later job is found
    running past it). Even trials then kill at a random point of a window
    narrowed towards the operation (a kill found before it raises the
    window's start, one after it lowers its end); odd trials at points
    spread evenly over 0 to 1.25 span. At least `trials` trials; more, up
    to twice as many, until the kills have landed inside the operation
    `min_inside` times, inside each of its `phases` (the name `phase(job)`
    gives) and while each of `commands` ran as often as asked, and on every
    outcome: where they land depends on the machine's speed.
    """

    def __init__(self, verb: str, agent: AgentProcess,
                 agent_factory: Callable[..., AgentProcess], rng: random.Random, *,
                 trials: int = TRIALS, min_inside: int = 3,
                 outcomes: Sequence[str] = (), phases: dict[str, int] | None = None,
                 commands: dict[str, int] | None = None) -> None:
        self.verb = verb
        self.agent = agent
        self._factory = agent_factory
        self.rng = rng
        self.trials = trials
        self.min_inside = min_inside
        self.stages: Counter[str] = Counter()
        self.phases: Counter[str] = Counter()
        self.aimed: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter({o: 0 for o in outcomes})
        self.min_phases = phases or {}
        self.min_commands = commands or {}
        self.commands: Counter[str] = Counter()
        self.unknown_jobs = self.unknown_acked = 0
        self.span = self.uncut = 0.0
        self.elapsed = 0.0
        self._lo = self._hi = 0.0
        self._spread: list[float] = []

    def covered(self) -> bool:
        return (self.stages["inside"] >= self.min_inside and all(self.outcomes.values())
                and all(self.phases[p] >= n for p, n in self.min_phases.items())
                and all(self.commands[c] >= n for c, n in self.min_commands.items()))

    def summary(self) -> str:
        done = sum(self.stages.values())
        return (f"kill -9 during {self.verb}: {done} trials in {self.elapsed:.0f} s "
                f"(uncut job {self.uncut * 1000:.0f} ms, kills up to "
                f"{1.25 * self.span * 1000:.0f} ms), kills {dict(self.stages)}"
                + (f", inside at {dict(self.phases)}" if self.phases else "")
                + (f" (aimed at {dict(self.aimed)})" if self.aimed else "")
                + f", commands killed with it {dict(self.commands)}, outcomes "
                f"{dict(self.outcomes)}"
                + (f", job unknown after restart {self.unknown_jobs} (its call answered "
                   f"before the kill {self.unknown_acked})" if self.unknown_jobs else ""))

    async def run(self, start: Start, check: Check, phase: Phase | None = None
                  ) -> AgentProcess:
        """Run the trials; returns the agent running at the end."""
        t0 = time.monotonic()
        await self._calibrate(start, check)
        trial = 0
        while trial < self.trials or (not self.covered() and trial < 2 * self.trials):
            await self._trial(start, check, phase, self._delay(trial))
            trial += 1
        self.elapsed = time.monotonic() - t0
        print(self.summary())
        assert self.covered(), self.summary()
        return self.agent

    async def _calibrate(self, start: Start, check: Check) -> None:
        async with self.agent.client() as c:
            job = await start(c)
            await c.call("ping")     # the connection is up: the job's call goes at once
            t = time.monotonic()
            await c.call(job.verb, jobUUID=job.uuid, **job.params)
            while (info := (await c.call("getJobs", jobUUIDs=[job.uuid]))[job.uuid])[
                    "status"] not in ENDED:
                assert time.monotonic() - t < 120, info
                await asyncio.sleep(0.005)
            self.span = self.uncut = time.monotonic() - t
            assert info["status"] == "done", info
            await check(c, job, Kill(delay=self.span, stage="uncut"))
        self._lo, self._hi = 0.0, self.span
        n = self.trials - self.trials // 2
        # fractions of 1.25 span, one in each of n equal parts
        self._spread = [(i + self.rng.random()) / n for i in range(n)]
        self.rng.shuffle(self._spread)

    def _delay(self, trial: int) -> float:
        if trial % 2 == 0:
            return self.rng.uniform(self._lo, self._hi)
        return 1.25 * self.span * (self._spread.pop() if self._spread else self.rng.random())

    def _learn(self, stage: str, delay: float) -> None:
        """Narrow the window towards the operation; widen it again once
        timing noise (or a job slower than the uncut one) closed it."""
        if stage == "after":
            self._hi = min(self._hi, delay)
        elif stage == "before":
            self._lo = max(self._lo, delay)
        else:   # inside: the job runs at least that long
            if delay > self._hi:
                self._hi = delay * 1.25
            self.span = max(self.span, delay)
        if self._hi - self._lo < self.span / 20:
            self._lo, self._hi = max(0.0, self._lo - self.span / 4), self._hi + self.span / 4

    async def _trial(self, start: Start, check: Check, phase: Phase | None,
                     delay: float) -> None:
        async with self.agent.client() as c:
            job = await start(c)
            before = storage_state(job.roots)
            await c.call("ping")     # the connection is up: the job's call goes at once
            # The delay counts from the call: a fast job may be over by the
            # time its reply is read.
            call = asyncio.ensure_future(c.call(job.verb, jobUUID=job.uuid, **job.params))
            if job.aim is not None:
                t = time.monotonic()
                while not job.aim.ready() and time.monotonic() - t < 3 * self.span + 5:
                    await asyncio.sleep(0.002)
                await asyncio.sleep(self.rng.uniform(0, job.aim.within))
                delay = time.monotonic() - t
                self.aimed[job.aim.step] += 1
            else:
                await asyncio.sleep(delay)
            commands = kill_tree(self.agent)
            acked = call.done() and call.exception() is None
            with contextlib.suppress(aiohttp.ClientError, RpcError):
                await call       # the reply, or the connection cut by the kill
            # the task keeps its error, whose traceback keeps the cut
            # connection: let go of it before collecting
            del call
        collect_cut_connections()
        status, error = job_status(self.agent, job.uuid)
        assert status != "failed", f"{job.verb} failed on its own: {error}"
        if status in ENDED:
            stage = "after"
        elif storage_state(job.roots) != before:
            stage = "inside"
        else:
            stage = "before"
        kill = Kill(delay=delay, stage=stage, commands=commands,
                    phase=phase(job) if phase and stage == "inside" else None)
        self.stages[stage] += 1
        if kill.phase:
            self.phases[kill.phase] += 1
        self.commands.update(commands)
        if job.aim is None:
            self._learn(stage, delay)
        self.agent = self._factory(self.agent.state_dir, port=self.agent.port)
        async with self.agent.client() as c:
            info = (await c.call("getJobs", jobUUIDs=[job.uuid])).get(job.uuid)
            if info is None:
                # never recorded: the kill came before the record's first write
                self.unknown_jobs += 1
                self.unknown_acked += acked
            else:
                # never left pending or running: the engine would wait forever
                assert info["status"] == "done" or (
                    info["status"] == "failed"
                    and info["error"]["code"] == JOB_INTERRUPTED), info
            outcome = await check(c, job, kill)
        self.outcomes[outcome] += 1


# ---- kill right after done ----------------------------------------------------------------


Starts = Callable[[Client], Awaitable[list[Job]]]
SeenCheck = Callable[[Client, list[Job], dict[str, dict[str, Any]]], Awaitable[None]]


@dataclass
class AfterDone:
    """What the "kill right after done" trials saw: jobs seen done before a
    kill, jobs not ended at it (their records say so), and seen-done jobs
    whose record on disk did not say done at the kill (what a restart then
    turns into an interrupted job)."""

    trials: int = 0
    seen_done: int = 0
    unended: int = 0
    lagging: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"kill -9 right after done: {self.trials} trials, {self.seen_done} jobs seen "
                f"done before the kill, {self.unended} jobs still running at it, records "
                f"not done at the kill {len(self.lagging)}")


def collect_cut_connections() -> None:
    """After a trial's kill cut this process's client connections: a TLS
    connection cut mid-request can leave its socket for the collector
    (aiohttp's and asyncio's, not the agent's: the agent is the process
    killed), and its ResourceWarning, an error under this suite's filters,
    would land in whichever test the collector next runs in. Collected here,
    where the cut is the test's own doing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def _kill_at_first_done(agent: AgentProcess, c: Client, jobs: list[Job],
                              timeout: float) -> dict[str, dict[str, Any]]:
    """Submit the jobs at once, follow them through `job.status`
    notifications and a tight getJobs poll, SIGKILL the agent the instant
    one is first seen done; the infos of the jobs seen done."""
    ids = {j.uuid for j in jobs}
    seen: dict[str, dict[str, Any]] = {}
    hit = asyncio.Event()

    def note(infos: Any) -> None:
        for info in infos:
            if info.get("jobUUID") not in ids or hit.is_set():
                continue
            assert info["status"] != "failed", f"a job failed on its own: {info}"
            if info["status"] == "done":
                seen[info["jobUUID"]] = info
        if seen and not hit.is_set():
            hit.set()
            kill_tree(agent)

    async def listen(q: asyncio.Queue[dict[str, Any]]) -> None:
        while not hit.is_set():
            n = await q.get()
            if n.get("method") == "job.status":
                note([n["params"]])

    async def poll() -> None:
        while not hit.is_set():
            with contextlib.suppress(aiohttp.ClientError, RpcError):
                note((await c.call("getJobs", jobUUIDs=sorted(ids))).values())

    async with c.notifications() as q:
        await asyncio.gather(*(c.call(j.verb, jobUUID=j.uuid, **j.params) for j in jobs))
        watchers = [asyncio.ensure_future(listen(q)), asyncio.ensure_future(poll())]
        try:
            await asyncio.wait_for(hit.wait(), timeout)
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    return seen


async def kill_after_done(agent: AgentProcess, agent_factory: Callable[..., AgentProcess],
                          start: Starts, check: SeenCheck, *, trials: int = TRIALS,
                          timeout: float = 120) -> tuple[AgentProcess, AfterDone]:
    """Each trial: submit the jobs `start(c)` returns at once, SIGKILL the
    agent the instant one is first seen `done` (`_kill_at_first_done`),
    restart it on the same state dir: every job seen done still reads done
    with the result it was seen with, no job is left pending or running;
    `check(c, jobs, seen)` then checks what they made (and clears the
    trial's leftovers). Returns the agent running at the end."""
    stats = AfterDone()
    for _ in range(trials):
        async with agent.client() as c:
            jobs = await start(c)
            seen = await _kill_at_first_done(agent, c, jobs, timeout)
        collect_cut_connections()
        stats.trials += 1
        stats.seen_done += len(seen)
        records = {j.uuid: job_status(agent, j.uuid)[0] for j in jobs}
        stats.unended += sum(s not in ENDED for s in records.values())
        stats.lagging += [u for u in seen if records[u] != "done"]
        agent = agent_factory(agent.state_dir, port=agent.port)
        async with agent.client() as c:
            after = await c.call("getJobs", jobUUIDs=sorted(records))
            for u, info in seen.items():
                assert after[u]["status"] == "done", (info, after[u])
                assert after[u].get("result") == info.get("result"), (info, after[u])
            for info in after.values():
                assert info["status"] == "done" or (
                    info["status"] == "failed"
                    and info["error"]["code"] == JOB_INTERRUPTED), info
            await check(c, jobs, seen)
    print(stats.summary())
    assert not stats.lagging, stats.summary()
    return agent, stats
