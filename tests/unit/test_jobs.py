import asyncio
import json
import uuid

import pytest

from agent import jobs as jobs_module
from agent.config import JobsConfig
from agent.events import EventBus
from agent.jobs import JobRegistry
from storage.errors import JobExists, JobNotDone, UnknownTask, VolumeDoesNotExist
from tests.polling import until


def new_id():
    return str(uuid.uuid4())


@pytest.fixture
async def registry(tmp_path):
    bus = EventBus()
    reg = JobRegistry(JobsConfig(progress_interval=0.05), tmp_path, bus)
    await reg.start()
    yield reg
    await reg.shutdown(grace=1)


async def wait_ended(reg, job_uuid, timeout=5):
    await until(lambda: reg.get(job_uuid).is_ended, f"job {job_uuid} ended", timeout)
    return reg.get(job_uuid)


async def test_job_runs_to_done_with_progress_events(registry):
    sub = registry.events.subscribe()

    async def work(ctx):
        for i in range(1, 5):
            await asyncio.sleep(0.06)
            ctx.progress(i * 25)
        return {"answer": 42}

    jid = new_id()
    registry.submit(jid, "test", work, description="four steps")
    job = await wait_ended(registry, jid)
    assert job.status == "done" and job.progress == 100 and job.result == {"answer": 42}
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait()["params"])
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pending" and statuses[-1] == "done"
    progress = [e["progress"] for e in events if e["status"] == "running"]
    assert progress == sorted(progress) and len(progress) >= 3


async def test_progress_is_throttled(tmp_path):
    bus = EventBus()
    reg = JobRegistry(JobsConfig(progress_interval=10), tmp_path, bus)
    await reg.start()
    sub = bus.subscribe()

    async def work(ctx):
        for i in range(100):
            ctx.progress(i)
            await asyncio.sleep(0)

    jid = new_id()
    reg.submit(jid, "test", work)
    await wait_ended(reg, jid)
    running = [m for m in (sub.queue.get_nowait() for _ in range(sub.queue.qsize()))
               if m["params"]["status"] == "running"]
    # only the status change itself: no progress event within the interval
    assert len(running) == 1
    await reg.shutdown(1)


async def test_same_uuid_returns_existing_job(registry):
    started = 0

    async def work(ctx):
        nonlocal started
        started += 1
        await asyncio.sleep(0.1)

    jid = new_id()
    a = registry.submit(jid, "test", work)
    b = registry.submit(jid, "test", work)
    assert a is b
    await wait_ended(registry, jid)
    assert registry.submit(jid, "test", work) is a
    # Tasks start in the order they are made: once a job submitted after the
    # resubmission has run, a second run of `work` would have started too.
    probe = new_id()
    registry.submit(probe, "test", lambda ctx: asyncio.sleep(0))
    await wait_ended(registry, probe)
    assert started == 1
    with pytest.raises(JobExists):
        registry.submit(jid, "other", work)


async def test_abort_cancels_and_reports_aborted(registry):
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def work(ctx):
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    jid = new_id()
    registry.submit(jid, "test", work)
    await started.wait()
    job = await registry.abort(jid)
    assert job.status == "aborted" and cleaned.is_set()
    assert job.error["code"] == 443


async def test_failures_carry_error_objects(registry):
    async def expected(ctx):
        raise VolumeDoesNotExist(volUUID="v1")

    async def unexpected(ctx):
        raise RuntimeError("secret internals")

    a, b = new_id(), new_id()
    registry.submit(a, "test", expected)
    registry.submit(b, "test", unexpected)
    ja, jb = await wait_ended(registry, a), await wait_ended(registry, b)
    assert ja.error == {"code": 201, "message": "Volume does not exist: v1",
                        "data": {"name": "VolumeDoesNotExist", "volUUID": "v1"}}
    assert jb.error["code"] == 100 and "secret" not in json.dumps(jb.error)


async def test_clear_and_unknown(registry):
    async def work(ctx):
        await asyncio.sleep(0.2)

    jid = new_id()
    registry.submit(jid, "test", work)
    with pytest.raises(JobNotDone):
        registry.clear(jid)
    await wait_ended(registry, jid)
    registry.clear(jid)
    with pytest.raises(UnknownTask):
        registry.get(jid)
    assert registry.info([jid]) == {}


async def test_pending_until_a_slot_is_free(tmp_path):
    reg = JobRegistry(JobsConfig(max_running=1), tmp_path, EventBus())
    await reg.start()
    gate = asyncio.Event()

    async def work(ctx):
        await gate.wait()

    a, b = new_id(), new_id()
    reg.submit(a, "test", work)
    reg.submit(b, "test", work)
    await until(lambda: reg.get(a).status == "running", "the first job runs")
    assert reg.get(a).status == "running" and reg.get(b).status == "pending"
    gate.set()
    await wait_ended(reg, b)
    await reg.shutdown(1)


async def interrupted_job(tmp_path, job_type="backupVolume", params=None, done=None):
    """A job record left running, as a crash leaves it (and, with `done`,
    the record of a job of the same registry that ended before)."""
    jid = new_id()
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    started = asyncio.Event()

    async def forever(ctx):
        started.set()
        await asyncio.sleep(3600)

    async def quick(ctx):
        return 1
    reg.submit(jid, job_type, forever, params=params)
    if done is not None:
        reg.submit(done, job_type, quick)
        await wait_ended(reg, done)
    await started.wait()
    # Simulate a crash: records on disk, nothing shut down cleanly.
    reg._writer.cancel()
    reg._sweeper.cancel()
    reg._flush()
    # (its task is cancelled by the caller at the end: a cancel writes the record)
    return jid, reg.get(jid).task


async def test_records_survive_restart_and_interrupted_jobs_recover(tmp_path):
    done = new_id()
    running, crashed = await interrupted_job(tmp_path, "copy", {"dst": "x"}, done=done)
    record = json.loads((tmp_path / "jobs" / f"{running}.json").read_text())
    assert record["status"] == "running" and record["params"] == {"dst": "x"}

    recovered = []

    async def hook(job):
        recovered.append((job.job_uuid, job.params))

    reg2 = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg2.register_recovery("copy", hook)
    await reg2.start()
    job = reg2.get(running)
    assert job.status == "failed" and job.error["data"]["name"] == "JobInterrupted"
    assert recovered == [(running, {"dst": "x"})]
    assert reg2.get(done).status == "done"
    await reg2.shutdown(1)
    crashed.cancel()
    await asyncio.wait([crashed])


@pytest.mark.parametrize("failures, calls", [(1, 2), (2, 3), (5, 3)])
async def test_a_failed_recovery_runs_again(tmp_path, monkeypatch, caplog, failures, calls):
    """Recovery hooks are idempotent and what fails them at start-up is often
    passing (qemu-img failing to start a thread under memory pressure left
    an interrupted backup's snapshot layer for good): run again after a
    pause, at most three times; the job is FAILED either way."""
    monkeypatch.setattr(jobs_module, "RECOVERY_PAUSES", (0.0, 0.0))
    jid, crashed = await interrupted_job(tmp_path)
    ran = []

    async def hook(job):
        ran.append(job.job_uuid)
        if len(ran) <= failures:
            raise RuntimeError("qemu_thread_create: Resource temporarily unavailable")

    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("backupVolume", hook)
    await reg.start()
    assert ran == [jid] * calls
    assert reg.get(jid).status == "failed"
    gave_up = [r for r in caplog.records if "3 attempts" in r.getMessage()]
    assert len(gave_up) == (1 if failures >= 3 else 0)
    await reg.shutdown(1)
    record = json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())
    assert record["status"] == "failed" and record["recovering"] == (failures >= 3)

    # the next start: a recovery that never ended runs again, one that did not
    ran.clear()
    failures = 0
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("backupVolume", hook)
    await reg.start()
    assert ran == ([jid] if record["recovering"] else [])
    await reg.shutdown(1)
    assert not json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())["recovering"]
    crashed.cancel()
    await asyncio.wait([crashed])


@pytest.mark.parametrize("live", [True, False])
async def test_a_live_recovery_runs_again_when_storage_is_back(tmp_path, monkeypatch, live):
    """An interrupted merge whose domain was not reachable at the start (its
    storage down, or its connection late): its recovery runs again when a
    domain comes back, not at the next start only (meanwhile the image's
    chain has an ILLEGAL layer and cannot be prepared). A hook that is not
    live waits for the next start."""
    monkeypatch.setattr(jobs_module, "RECOVERY_PAUSES", (0.0, 0.0))
    jid, crashed = await interrupted_job(tmp_path, "mergeSnapshots")
    ran = []
    back = False
    done = asyncio.Event()

    async def hook(job):
        ran.append(job.job_uuid)
        if not back:
            raise VolumeDoesNotExist(volUUID="x")
        done.set()

    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("mergeSnapshots", hook, live=live)
    await reg.start()
    assert ran == [jid] * 3 and reg.get(jid).recovering
    back = True
    reg.storage_back()
    if live:
        await asyncio.wait_for(done.wait(), 10)
        assert ran == [jid] * 4 and not reg.get(jid).recovering
    else:
        # nothing to run it again before the next start
        assert reg._retrier is None and ran == [jid] * 3 and reg.get(jid).recovering
    await reg.shutdown(1)
    record = json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())
    assert record["status"] == "failed" and record["recovering"] == (not live)
    crashed.cancel()
    await asyncio.wait([crashed])


async def test_a_live_recovery_runs_again_in_time(tmp_path, monkeypatch):
    """With no storage coming back (the storage was there, the hook failed
    for a passing reason), a live recovery runs again every LIVE_RETRY."""
    monkeypatch.setattr(jobs_module, "RECOVERY_PAUSES", ())
    monkeypatch.setattr(jobs_module, "LIVE_RETRY", 0.05)
    jid, crashed = await interrupted_job(tmp_path, "mergeSnapshots")
    ran = []
    done = asyncio.Event()

    async def hook(job):
        ran.append(job.job_uuid)
        if len(ran) < 3:
            raise RuntimeError("Resource temporarily unavailable")
        done.set()

    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("mergeSnapshots", hook, live=True)
    await reg.start()
    await asyncio.wait_for(done.wait(), 10)
    assert ran == [jid] * 3 and not reg.get(jid).recovering
    await reg.shutdown(1)
    assert not json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())["recovering"]
    crashed.cancel()
    await asyncio.wait([crashed])


async def test_a_cleared_job_keeps_its_pending_recovery(tmp_path, monkeypatch):
    """The engine clears the failed job: it is no longer listed, but what
    its recovery must still remove is not forgotten."""
    monkeypatch.setattr(jobs_module, "RECOVERY_PAUSES", ())
    jid, crashed = await interrupted_job(tmp_path)
    ok = False
    ran = []

    async def hook(job):
        ran.append(job.job_uuid)
        if not ok:
            raise RuntimeError("busy")

    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("backupVolume", hook)
    await reg.start()
    reg.clear(jid)
    with pytest.raises(UnknownTask):
        reg.get(jid)
    await reg.shutdown(1)
    assert (tmp_path / "jobs" / f"{jid}.json").exists()

    ok = True
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    reg.register_recovery("backupVolume", hook)
    await reg.start()
    assert ran == [jid, jid]
    with pytest.raises(UnknownTask):
        reg.get(jid)                      # still not listed
    await reg.shutdown(1)
    assert not (tmp_path / "jobs" / f"{jid}.json").exists()
    crashed.cancel()
    await asyncio.wait([crashed])


class RecordReadingBus(EventBus):
    """Reads a job's record on disk at the instant its end is published:
    what a crash right after a client saw that end would leave."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.seen = {}

    def publish(self, method, params):
        if method == "job.status" and params["status"] in ("done", "failed", "aborted"):
            path = self.records / f"{params['jobUUID']}.json"
            record = json.loads(path.read_text()) if path.exists() else {}
            self.seen[params["jobUUID"]] = (params["status"], record.get("status"),
                                            record.get("result"))
        super().publish(method, params)


async def test_an_end_is_on_disk_before_it_is_shown(tmp_path):
    bus = RecordReadingBus(tmp_path / "jobs")
    reg = JobRegistry(JobsConfig(), tmp_path, bus)
    await reg.start()
    started = asyncio.Event()

    async def quick(ctx):
        return {"volUUID": "v"}

    async def failing(ctx):
        raise VolumeDoesNotExist(volUUID="v")

    async def forever(ctx):
        started.set()
        await asyncio.sleep(3600)

    ok, bad, aborted = new_id(), new_id(), new_id()
    reg.submit(ok, "test", quick)
    reg.submit(bad, "test", failing)
    reg.submit(aborted, "test", forever)
    await started.wait()
    await reg.abort(aborted)
    await wait_ended(reg, ok)
    await wait_ended(reg, bad)
    assert bus.seen == {ok: ("done", "done", {"volUUID": "v"}),
                        bad: ("failed", "failed", None),
                        aborted: ("aborted", "aborted", None)}
    await reg.shutdown(1)


async def test_a_job_is_recorded_running_before_its_work_starts(tmp_path, monkeypatch):
    """The work finds its record on disk saying running, with its start:
    what a restart's recovery needs to undo what it made, even when the
    background writer is slow (it is held here until the work has looked)."""
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    looked = asyncio.Event()
    writer_flush = reg._flush

    async def held_writer():
        while True:
            await reg._dirty_event.wait()
            await looked.wait()
            reg._dirty_event.clear()
            await asyncio.to_thread(writer_flush)

    reg._writer.cancel()
    reg._writer = asyncio.create_task(held_writer())
    seen = {}

    async def work(ctx):
        seen.update(json.loads((tmp_path / "jobs" / f"{job}.json").read_text()))
        looked.set()
        return {}

    job = new_id()
    reg.submit(job, "test", work)
    await wait_ended(reg, job)
    assert seen["status"] == "running" and seen["started"] is not None, seen
    await reg.shutdown(1)


async def test_a_job_s_running_record_is_written_once(tmp_path, monkeypatch):
    """The running record is written directly before the work, and not a
    second time by the background writer (which the old code woke with the
    same record)."""
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    real_write = jobs_module.atomic_write
    running: list[bytes] = []

    def counted(path, data, **kw):
        if b'"running"' in data:
            running.append(data)
        real_write(path, data, **kw)

    monkeypatch.setattr(jobs_module, "atomic_write", counted)

    async def work(ctx):
        # the writer has had its turns (it writes on the loop's next rounds)
        for _ in range(5):
            await asyncio.to_thread(reg._flush)
        return {}

    job = new_id()
    reg.submit(job, "test", work)
    await wait_ended(reg, job)
    assert len(running) == 1, running
    await reg.shutdown(1)


async def test_a_job_whose_record_cannot_be_written_fails_before_its_work(tmp_path,
                                                                            monkeypatch):
    """A full state file system: the job cannot say it runs, so it must not
    (a crash would leave what it made to no recovery): failed, 2107
    HostStateError, its work never called."""
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    real_write = jobs_module.atomic_write

    def full(path, data, **kw):
        if b'"running"' in data:
            raise OSError(28, "No space left on device")
        real_write(path, data, **kw)

    monkeypatch.setattr(jobs_module, "atomic_write", full)
    ran = []

    async def work(ctx):
        ran.append(True)
        return {}

    job = new_id()
    reg.submit(job, "test", work)
    ended = await wait_ended(reg, job)
    assert ended.status == "failed" and ended.error["code"] == 2107, ended.error
    assert "No space left on device" in ended.error["message"], ended.error
    assert ran == []
    await reg.shutdown(1)


async def test_shutdown_cancels_after_grace(tmp_path):
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    started = asyncio.Event()

    async def forever(ctx):
        started.set()
        await asyncio.sleep(3600)

    jid = new_id()
    reg.submit(jid, "test", forever)
    await started.wait()
    await reg.shutdown(grace=0.1)
    assert reg.get(jid).status == "failed"
    record = json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["data"]["name"] == "JobInterrupted"


async def test_ended_jobs_are_swept(tmp_path):
    reg = JobRegistry(JobsConfig(keep_ended_seconds=0.5), tmp_path, EventBus())
    await reg.start()

    async def quick(ctx):
        return None

    jid = new_id()
    reg.submit(jid, "test", quick)
    await wait_ended(reg, jid)
    # the sweeper runs every max(1, keep/4) s
    await until(lambda: not reg.info([jid]), "the ended job swept", timeout=3)
    await reg.shutdown(1)
    assert not (tmp_path / "jobs" / f"{jid}.json").exists()


class _FullState:
    """JobRegistry._write failing with ENOSPC while `full` (the state
    directory's file system full), counting the attempts."""

    def __init__(self, monkeypatch):
        self.full = False
        self.failed = 0
        write = JobRegistry._write

        def _write(path, job):
            if self.full:
                self.failed += 1
                raise OSError(28, "No space left on device")
            write(path, job)
        monkeypatch.setattr(JobRegistry, "_write", staticmethod(_write))


async def test_a_done_job_is_reported_done_once_recorded(tmp_path, monkeypatch):
    """The work ends while the state directory is full: the job stays
    running (a crash now would undo what it made after the client saw it
    done) until its end is on disk, then is done."""
    monkeypatch.setattr(jobs_module, "RECORD_RETRY", 0.01)
    state = _FullState(monkeypatch)
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()

    async def work(ctx):
        state.full = True
        return {"made": 1}
    jid = new_id()
    reg.submit(jid, "test", work)
    await until(lambda: state.failed >= 3, "the end tried again")
    assert reg.get(jid).status == "running"
    state.full = False
    job = await wait_ended(reg, jid)
    assert job.status == "done" and job.result == {"made": 1}
    record = json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())
    assert record["status"] == "done"
    await reg.shutdown(1)


@pytest.mark.parametrize("when", ["failed", "stopped"])
async def test_a_job_ends_when_its_end_cannot_be_written(tmp_path, monkeypatch, when):
    """The state directory full: a job that failed is failed at once (it
    stayed running for ever: the unwritten record's error escaped); a done
    one the agent stops meanwhile ends failed, 2107, as the next start's
    recovery will have it (its record still says running)."""
    monkeypatch.setattr(jobs_module, "RECORD_RETRY", 0.01)
    state = _FullState(monkeypatch)
    reg = JobRegistry(JobsConfig(), tmp_path, EventBus())
    await reg.start()
    ran = []

    async def work(ctx):
        ran.append(1)
        state.full = True
        if when == "failed":
            raise VolumeDoesNotExist(volUUID="x")
        return 1
    jid = new_id()
    reg.submit(jid, "test", work)
    if when == "stopped":
        await until(lambda: state.failed >= 2, "the end tried again")
        await reg.shutdown(1)
    job = await wait_ended(reg, jid)
    assert job.status == "failed", job.info()
    assert job.error["code"] == {"failed": 201, "stopped": 2107}[when]
    assert ran == [1]
    if when != "stopped":
        await reg.shutdown(1)
    # the record on disk still says running
    assert json.loads((tmp_path / "jobs" / f"{jid}.json").read_text())["status"] == "running"
