"""Jobs: long operations with a client-chosen id, progress, abort, records.

A job runs its work as an asyncio task; abort cancels that task, and the
cancellation reaches whatever it awaits, child processes included (the
command runner kills them). Each record is written to the state dir on every
status change (an ending job's before its end is shown: `done` seen is
`done` after a crash), so after a crash the agent still knows the job: a job that
was pending or running is then reported `failed` as interrupted, and the
operation that owns its type gets a recovery hook to clean what it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent import logs
from agent.config import JobsConfig
from agent.events import EventBus
from agent.metrics import Metrics
from storage.errors import (
    ActionStopped,
    HostAgentError,
    HostStateError,
    JobExists,
    JobInterrupted,
    JobNotDone,
    UnknownTask,
    wire_error,
)
from storage.fileio import atomic_write

log = logging.getLogger("agent.jobs")

# a job done whose end cannot be recorded tries again this often (seconds)
RECORD_RETRY = 1.0
# a failed recovery hook runs again after these pauses (seconds)
RECOVERY_PAUSES = (0.5, 2.0)
# a live hook (register_recovery) that failed at the start runs again this
# often, and whenever storage comes back (storage_back)
LIVE_RETRY = 60.0

PENDING, RUNNING, DONE, FAILED, ABORTED = "pending", "running", "done", "failed", "aborted"
STATES = (PENDING, RUNNING, DONE, FAILED, ABORTED)
ENDED = (DONE, FAILED, ABORTED)


@dataclass
class Job:
    job_uuid: str
    type: str
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    status: str = PENDING
    progress: int = 0
    error: dict[str, Any] | None = None
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    # an interrupted job whose recovery hook has not yet run to its end: run
    # again at the next start, and the record kept until then
    recovering: bool = False
    # cleared by the engine while `recovering`: not listed, its record kept
    # on disk for that recovery only
    cleared: bool = False
    # Runtime only, never persisted.
    task: asyncio.Task[None] | None = field(default=None, repr=False, compare=False)
    abort_requested: bool = field(default=False, repr=False, compare=False)
    last_sent: float = field(default=0.0, repr=False, compare=False)

    @property
    def is_ended(self) -> bool:
        return self.status in ENDED

    def info(self) -> dict[str, Any]:
        info = {"jobUUID": self.job_uuid, "type": self.type, "status": self.status,
                "progress": self.progress, "error": self.error,
                "description": self.description, "started": self.started,
                "ended": self.ended}
        if self.result is not None:
            info["result"] = self.result
        if self.recovering:
            # interrupted, and what it left is not cleaned up yet
            info["recovering"] = True
        return info

    def record(self) -> dict[str, Any]:
        return {**self.info(), "params": self.params, "created": self.created,
                "result": self.result, "recovering": self.recovering, "cleared": self.cleared}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Job:
        return cls(job_uuid=r["jobUUID"], type=r["type"], description=r.get("description", ""),
                   params=r.get("params") or {}, status=r["status"],
                   progress=int(r.get("progress", 0)), error=r.get("error"),
                   result=r.get("result"), created=r.get("created", time.time()),
                   started=r.get("started"), ended=r.get("ended"),
                   recovering=bool(r.get("recovering", False)),
                   cleared=bool(r.get("cleared", False)))


class JobContext:
    """What a job's work sees: its record and a progress callback."""

    def __init__(self, registry: JobRegistry, job: Job) -> None:
        self._registry = registry
        self.job = job

    @property
    def job_uuid(self) -> str:
        return self.job.job_uuid

    def progress(self, percent: float) -> None:
        self._registry._set_progress(self.job, percent)


Work = Callable[[JobContext], Awaitable[Any]]
RecoveryHook = Callable[[Job], Awaitable[None]]


class JobRegistry:
    def __init__(self, config: JobsConfig, state_dir: Path, events: EventBus,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.dir = state_dir / "jobs"
        self.events = events
        self.metrics = metrics
        self._jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(config.max_running)
        self._recovery: dict[str, RecoveryHook] = {}
        self._live: set[str] = set()
        # live recoveries that did not end at the start: tried again while serving
        self._unrecovered: dict[str, Job] = {}
        self._storage_back = asyncio.Event()
        self._retrier: asyncio.Task[None] | None = None
        self._dirty: dict[str, Job | None] = {}
        self._dirty_event = asyncio.Event()
        self._flush_lock = threading.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------

    def register_recovery(self, job_type: str, hook: RecoveryHook, *,
                          live: bool = False) -> None:
        """`hook(job)` runs at start-up for each job of this type that the
        agent found interrupted, to clean what the job left behind; if it
        fails there, again at the next start. A `live` hook may also run
        while the agent serves (what it finishes is fenced off from the
        engine's calls until then): one that failed at the start is tried
        again when storage comes back and every LIVE_RETRY seconds, so that
        a domain whose storage was down at the start is not left half done
        until the next one."""
        self._recovery[job_type] = hook
        if live:
            self._live.add(job_type)

    def storage_back(self) -> None:
        """A domain became reachable (activated after the start): the live
        recoveries still pending are tried again now."""
        self._storage_back.set()

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        interrupted = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                job = Job.from_record(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("Ignoring unreadable job record %s: %s", path, e)
                continue
            if not job.is_ended:
                job.status = FAILED
                job.error = JobInterrupted(jobUUID=job.job_uuid).to_dict()
                job.ended = time.time()
                job.recovering = job.type in self._recovery
                interrupted.append(job)
                log.warning("Job %s (%s) was interrupted by an agent stop", job.job_uuid,
                            job.type)
            elif job.recovering:
                interrupted.append(job)
                log.warning("Job %s (%s): its recovery did not end at the last start; "
                            "again", job.job_uuid, job.type)
            if not job.cleared:
                self._jobs[job.job_uuid] = job
            elif not job.recovering:    # (its recovery ended; its removal did not)
                self._drop_record(job)
        self._writer = asyncio.create_task(self._write_records(), name="job-records")
        self._sweeper = asyncio.create_task(self._sweep(), name="job-sweeper")
        for job in interrupted:
            hook = self._recovery.get(job.type)
            if hook is None:
                job.recovering = False
            self._save(job)
            if hook is not None and job.recovering:
                await self._recover(job, hook)
        # (domains activated during the start: their recoveries just ran)
        self._storage_back.clear()
        if self._unrecovered:
            self._retrier = asyncio.create_task(self._retry_live(), name="job-recoveries")
        self._update_metrics()

    async def _recover(self, job: Job, hook: RecoveryHook) -> None:
        """Run a recovery hook, again after a pause if it failed: hooks are
        idempotent, and what fails them at start-up is often passing (a
        CI run saw `qemu-img map` fail to start a thread, "Resource
        temporarily unavailable", and an interrupted backup's snapshot
        layer was left for good). The job record is FAILED either way; one
        whose hook never succeeded keeps `recovering` for the next start,
        and a live one is tried again meanwhile."""
        for attempt, pause in enumerate((*RECOVERY_PAUSES, None), start=1):
            try:
                await hook(job)
            except Exception:
                if pause is None:
                    live = job.type in self._live
                    if live:
                        self._unrecovered[job.job_uuid] = job
                    log.exception("Recovery of interrupted job %s failed (%d attempts); "
                                  "again %s", job.job_uuid, attempt,
                                  "when storage comes back, or at the next start" if live
                                  else "at the next start")
                    return
                log.warning("Recovery of interrupted job %s failed (attempt %d), again in "
                            "%g s", job.job_uuid, attempt, pause, exc_info=True)
            else:
                self._recovered(job)
                return
            await asyncio.sleep(pause)

    async def _retry_live(self) -> None:
        """The live recoveries the start left pending, until each has ended."""
        while self._unrecovered:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LIVE_RETRY):
                    await self._storage_back.wait()
            self._storage_back.clear()
            for job in list(self._unrecovered.values()):
                try:
                    await self._recovery[job.type](job)
                except Exception as e:
                    log.warning("Recovery of interrupted job %s failed again: %s",
                                job.job_uuid, e)
                    continue
                log.info("Interrupted job %s (%s) recovered", job.job_uuid, job.type)
                del self._unrecovered[job.job_uuid]
                self._recovered(job)

    def _recovered(self, job: Job) -> None:
        job.recovering = False
        if job.cleared:     # the engine is done with it: so is its record
            self._drop_record(job)
        else:
            self._save(job)

    async def shutdown(self, grace: float | None = None) -> None:
        """Let running jobs finish within `grace`, cancel the rest (they are
        recorded failed as interrupted), then flush the records."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        tasks = [j.task for j in self._jobs.values() if j.task and not j.task.done()]
        if tasks:
            log.info("Waiting up to %.0f s for %d running job(s)", grace, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=max(grace, 5.0))
        for bg in (self._retrier, self._sweeper, self._writer):
            if bg is not None:
                bg.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bg
        await asyncio.to_thread(self._flush)

    # ---- verbs -------------------------------------------------------------

    def submit(self, job_uuid: str, job_type: str, work: Work, *, description: str = "",
               params: dict[str, Any] | None = None, slot: bool = True) -> Job:
        """Start `work` as job `job_uuid`; the same id again returns the
        existing job and starts nothing. `slot=False`: the job runs at once,
        outside jobs.max_running (a disk transfer's job, which waits on its
        client for hours and must not keep other jobs pending)."""
        existing = self._jobs.get(job_uuid)
        if existing is not None:
            if existing.type != job_type:
                raise JobExists(jobUUID=job_uuid)
            return existing
        job = Job(job_uuid=job_uuid, type=job_type, description=description,
                  params=params or {})
        self._jobs[job_uuid] = job
        self._save(job)
        job.task = asyncio.create_task(self._run(job, work, slot), name=f"job-{job_uuid}")
        self._changed(job)
        return job

    async def submit_recorded(self, job_uuid: str, job_type: str, work: Work, *,
                              description: str = "",
                              params: dict[str, Any] | None = None, slot: bool = True) -> Job:
        """`submit`, answering once the job's record is on disk: a job its
        caller was told about is known after a crash right after (and its
        recovery hook runs), never lost."""
        job = self.submit(job_uuid, job_type, work, description=description, params=params,
                          slot=slot)
        await asyncio.to_thread(self._flush)
        return job

    def get(self, job_uuid: str) -> Job:
        try:
            return self._jobs[job_uuid]
        except KeyError:
            raise UnknownTask(jobUUID=job_uuid) from None

    def info(self, job_uuids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        if job_uuids is None:
            return {u: j.info() for u, j in self._jobs.items()}
        return {u: self._jobs[u].info() for u in job_uuids if u in self._jobs}

    async def abort(self, job_uuid: str) -> Job:
        """Cancel a pending or running job and wait until its work has
        cleaned up; an ended job is returned as it is."""
        job = self.get(job_uuid)
        if job.is_ended or job.task is None:
            return job
        job.abort_requested = True
        job.task.cancel()
        # shield: the caller's own cancellation must not cut the job's cleanup
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(job.task)
        return job

    def clear(self, job_uuid: str) -> None:
        job = self.get(job_uuid)
        if not job.is_ended:
            raise JobNotDone(jobUUID=job_uuid, status=job.status)
        if job.recovering:
            # gone for the engine; its record stays for the next start's recovery
            job.cleared = True
            del self._jobs[job_uuid]
            self._save(job)
            self._update_metrics()
            return
        self._forget(job)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for job in self._jobs.values():
            counts[job.status] += 1
        return counts

    # ---- internals ---------------------------------------------------------

    async def _run(self, job: Job, work: Work, slot: bool = True) -> None:
        logs.job_id.set(job.job_uuid)
        logs.request_id.set("")
        try:
            async with self._slots if slot else contextlib.nullcontext():
                job.status, job.started = RUNNING, time.time()
                self._announce(job)     # saved below, directly (not also by the writer)
                # Its record says running, and since when, before the work
                # changes anything: a restart's recovery removes what the
                # job made after that time, and takes a record that never
                # said running for a job that never ran. (Left to the
                # writer, a kill -9 could come after the job's first volume
                # and before the record: a half-made result nobody removed.)
                # A record that cannot be written (a full state file system)
                # fails the job before it starts.
                try:
                    await asyncio.to_thread(self._flush_job, job)
                except OSError as e:
                    raise HostStateError.of(f"job {job.job_uuid} as running", self.dir, e) from None
                log.info("Job %s (%s) started", job.job_uuid, job.type)
                result = await work(JobContext(self, job))
        except asyncio.CancelledError:
            if job.abort_requested:
                await self._end(job, ABORTED, error=wire_error(ActionStopped()))
            else:
                await self._end(job, FAILED,
                                error=wire_error(JobInterrupted(jobUUID=job.job_uuid)))
        except Exception as e:
            if not isinstance(e, HostAgentError):
                log.exception("Job %s (%s) failed unexpectedly", job.job_uuid, job.type)
            await self._end(job, FAILED, error=wire_error(e))
        else:
            await self._end(job, DONE, result=result)

    async def _end(self, job: Job, status: str, *, error: dict[str, Any] | None = None,
                   result: Any = None) -> None:
        """End a job in one ordered step: its final record on disk first,
        then the status in memory (getJobs) and on the WebSocket. A client
        that saw `done` has moved on: a crash must not turn it into an
        interrupted job whose recovery removes what it made (issue 22). So
        a job done whose end cannot be recorded (the state directory's file
        system full) stays running, tried again every RECORD_RETRY seconds;
        cancelled meanwhile (a stop), it ends failed, as the next start's
        recovery will have it. A failed or aborted job ends at once, its
        record left saying running: the recovery cleans what it may have left."""
        ended = replace(job, status=status, error=error, result=result, ended=time.time(),
                        progress=100 if status == DONE else job.progress)
        cancelled, waited = False, 0.0
        while True:
            failure, cut = await self._record_end(ended)
            cancelled = cancelled or cut
            if failure is None or status != DONE or cancelled:
                break
            if not waited:
                log.error("Job %s (%s) is done, but its end cannot be recorded in %s (%s): "
                          "it is reported running until it can be", job.job_uuid, job.type,
                          self.dir, failure)
            try:
                await asyncio.sleep(RECORD_RETRY)
            except asyncio.CancelledError:
                cancelled = True
                break
            waited += RECORD_RETRY
        if failure is not None:
            log.error("Cannot write the final record of job %s: %s", job.job_uuid, failure)
            if status == DONE:
                ended = replace(ended, status=FAILED, result=None, progress=job.progress,
                                error=wire_error(HostStateError.of(
                                    f"the end of job {job.job_uuid}", self.dir, failure)))
        elif waited:
            log.info("Job %s (%s): its end recorded after %.0f s", job.job_uuid, job.type,
                     waited)
        job.status, job.error, job.result = ended.status, ended.error, ended.result
        job.ended, job.progress = ended.ended, ended.progress
        log.info("Job %s (%s) %s%s", job.job_uuid, job.type, job.status,
                 f": {job.error['message']}" if job.error else "")
        self._changed(job)
        if cancelled:
            raise asyncio.CancelledError

    async def _record_end(self, ended: Job) -> tuple[BaseException | None, bool]:
        """_write_final in a thread, waited for even through a cancellation
        (an abort or shutdown arriving now finds the work over: the record
        is written and the job ends as it did): (its error, cancelled)."""
        write = asyncio.ensure_future(asyncio.to_thread(self._write_final, ended))
        cancelled = False
        while not write.done():
            with contextlib.suppress(Exception):     # returned below
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    cancelled = True
        return (None if write.cancelled() else write.exception()), cancelled

    def _write_final(self, job: Job) -> None:
        """The record of an ending job, written now (under the writers' lock,
        superseding what the background writer had pending for it)."""
        with self._flush_lock:
            self._dirty.pop(job.job_uuid, None)
            self._write(self.dir / f"{job.job_uuid}.json", job)

    def _set_progress(self, job: Job, percent: float) -> None:
        value = max(job.progress, min(100, int(percent)))
        if value == job.progress:
            return
        job.progress = value
        now = time.monotonic()
        if now - job.last_sent >= self.config.progress_interval:
            job.last_sent = now
            self.events.publish("job.status", job.info())

    def _changed(self, job: Job) -> None:
        self._announce(job)
        self._save(job)

    def _announce(self, job: Job) -> None:
        job.last_sent = time.monotonic()
        self.events.publish("job.status", job.info())
        self._update_metrics()

    def _forget(self, job: Job) -> None:
        del self._jobs[job.job_uuid]
        self._drop_record(job)
        self._update_metrics()

    def _drop_record(self, job: Job) -> None:
        """Its record removed by the writer."""
        self._dirty[job.job_uuid] = None
        self._dirty_event.set()

    def _update_metrics(self) -> None:
        if self.metrics is not None:
            for state, n in self.counts().items():
                self.metrics.jobs.labels(state).set(n)

    def _save(self, job: Job) -> None:
        self._dirty[job.job_uuid] = job
        self._dirty_event.set()

    async def _write_records(self) -> None:
        """One writer for every record: file I/O off the loop, latest state wins."""
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        with self._flush_lock:
            self._flush_locked()

    def _flush_job(self, job: Job) -> None:
        """Write this job's record now, under the writer's lock; OSError if
        it cannot be (the writer only logs its errors)."""
        with self._flush_lock:
            if self._dirty.get(job.job_uuid) is job:
                del self._dirty[job.job_uuid]
            self._write(self.dir / f"{job.job_uuid}.json", job)

    def _flush_locked(self) -> None:
        while self._dirty:
            job_uuid, job = self._dirty.popitem()
            path = self.dir / f"{job_uuid}.json"
            try:
                if job is None:
                    path.unlink(missing_ok=True)
                else:
                    self._write(path, job)
            except OSError as e:
                log.error("Cannot write job record %s: %s", path, e)

    @staticmethod
    def _write(path: Path, job: Job) -> None:
        try:
            data = json.dumps(job.record()).encode()
        except (TypeError, ValueError) as e:
            log.error("Cannot write job record %s: %s", path, e)
            return
        atomic_write(path, data, mode=0o600)

    async def _sweep(self) -> None:
        keep = self.config.keep_ended_seconds
        while True:
            await asyncio.sleep(min(60.0, max(1.0, keep / 4)))
            cutoff = time.time() - keep
            for job in list(self._jobs.values()):
                # (a record with its recovery pending stays for the next start)
                if job.is_ended and (job.ended or 0) < cutoff and not job.recovering:
                    self._forget(job)

