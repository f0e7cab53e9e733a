"""A domain whose storage hangs (a FUSE file system whose operations block):
the agent keeps answering, reports the domain failing, ends operations on it
with 851 (or 379) after their deadline, keeps the other domain working, and
recovers the domain without a restart when the storage answers again."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess
from tests.integration.hangfs import HangFs, build
from tests.integration.test_ovfstore import Domain as OvfDomain
from tests.integration.test_ovfstore import get, make_tar, upload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

IO_TIMEOUT = 2.0
MONITOR_INTERVAL = 1.0
COMMAND_TIMEOUT = 5.0
CONFIG = (f"[storage]\nio_timeout = {IO_TIMEOUT}\nmonitor_interval = {MONITOR_INTERVAL}\n"
          f"command_timeout = {COMMAND_TIMEOUT}\n")
# Scheduling noise on a loaded 2-CPU test host, added to every time bound.
SLACK = 1.5
# A call on the hung domain may wait for one I/O deadline, and on its way
# out for one more (cleanup of a half-made volume) or for a killed child
# (the runner's SIGTERM/SIGKILL grace periods).
HUNG_CALL_BOUND = 2 * IO_TIMEOUT + 4.0 + SLACK
TIMEOUT_CODES = (851, 379)  # ResourceTimeout, StorageDomainAccessError
GiB = 1024**3


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="session")
def hangfs_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("hangfs-bin"))


@pytest.fixture
def hangfs(tmp_path: Path, hangfs_binary: Path) -> Iterator[HangFs]:
    fs = HangFs(tmp_path, hangfs_binary)
    try:
        yield fs.start()
    finally:
        fs.stop()


@pytest.fixture
def agent_on_hangfs(hangfs: HangFs, agent_factory: Callable[..., AgentProcess],
                    tmp_path: Path) -> Iterator[AgentProcess]:
    state = tmp_path / "state"
    state.mkdir()
    (state / "hostagent.toml").write_text(CONFIG)
    agent = agent_factory(state)
    try:
        yield agent
    finally:
        # Before the agent is stopped (agent_factory's teardown runs after
        # this): its threads and children blocked in the FUSE mount must be
        # able to finish, or the agent cannot exit.
        hangfs.release()


class Domain:
    def __init__(self, c: Client, path: Path) -> None:
        self.c = c
        self.conn = {"id": new_id(), "connection": str(path)}
        self.sd = new_id()
        self.img = new_id()
        self.vol = new_id()

    async def setup(self, name: str) -> None:
        [st] = await self.c.call("connectStorageServer", domType="localfs",
                                 connectionParams=[self.conn])
        assert st["status"] == 0, st
        await self.c.call("createStorageDomain", sdUUID=self.sd, domType="localfs",
                          name=name, connectionId=self.conn["id"], ovfStore=False)
        info = await self.create_volume(self.img, self.vol)
        assert info["status"] == "done", info

    async def create_volume(self, img: str, vol: str) -> dict[str, Any]:
        job = new_id()
        await self.c.call("createVolume", jobUUID=job, sdUUID=self.sd, imgUUID=img,
                          volUUID=vol, size=GiB, format="cow", preallocate="sparse")
        return await self.c.wait_job(job, timeout=60, poll=0.2)

    async def state(self) -> str:
        info = await self.c.call("getStorageDomainInfo", sdUUID=self.sd)
        return str(info["monitoring"]["state"])

    async def wait_state(self, state: str, timeout: float) -> float:
        """Seconds until the domain's monitoring reports `state`."""
        start = time.monotonic()
        while (got := await self.state()) != state:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"domain {self.sd} still {got!r}, not {state!r}, "
                                     f"after {timeout} s")
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def volume_info(self) -> dict[str, Any]:
        return dict(await self.c.call("getVolumeInfo", sdUUID=self.sd, imgUUID=self.img,
                                      volUUID=self.vol))

    async def prepare(self) -> dict[str, Any]:
        return dict(await self.c.call("prepareImage", sdUUID=self.sd, imgUUID=self.img,
                                      volUUID=self.vol, purpose="read"))

    async def teardown(self) -> None:
        await self.c.call("teardownImage", sdUUID=self.sd, imgUUID=self.img)


async def fails_in_time(what: str, call: Any) -> tuple[str, int, float]:
    """Await `call`; it must fail with 851 or 379 within HUNG_CALL_BOUND."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(HUNG_CALL_BOUND + 10):
            result = await call
    except RpcError as e:
        elapsed = time.monotonic() - start
        assert e.code in TIMEOUT_CODES, f"{what}: {e.code} {e.message}"
        return what, e.code, elapsed
    except TimeoutError:
        raise AssertionError(f"{what} on the hung domain did not end") from None
    raise AssertionError(f"{what} on the hung domain answered {result!r}")


async def hung_job(d: Domain) -> None:
    """createVolume on the hung domain: its job fails with 851/379."""
    info = await d.create_volume(new_id(), new_id())
    assert info["status"] == "failed", info
    error = info["error"]
    raise RpcError(error["code"], error["message"], error.get("data"))


async def unreachable_in_time(c: Client, d: Domain) -> tuple[str, int, float]:
    """testStorageConnection on the hung storage: its checker child cannot be
    killed, still the call answers 'not reachable' after its deadline."""
    start = time.monotonic()
    async with asyncio.timeout(HUNG_CALL_BOUND + 10):
        r = await c.call("testStorageConnection", domType="localfs", connection=d.conn)
    assert r["reachable"] is False, r
    return "testStorageConnection", r["details"]["code"], time.monotonic() - start


async def pings(c: Client, seconds: float) -> list[float]:
    lat = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t = time.perf_counter()
        assert await c.call("ping") == {}
        lat.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    return lat


def children(pid: int, program: str, word: str) -> list[int]:
    """Child processes of `pid` running `program` with `word` in an argument."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        if Path(argv[0]).name == program and any(word in a for a in argv[1:]):
            found.append(int(proc.name))
    return found


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def test_hung_domain(agent_on_hangfs: AgentProcess, hangfs: HangFs, tmp_path: Path):
    agent = agent_on_hangfs
    healthy_dir = tmp_path / "healthy"
    healthy_dir.mkdir()
    (hangfs.mountpoint / "store").mkdir()
    # Enough connections that the calls below do not queue in the client.
    async with Client.for_dev(agent.state_dir, port=agent.port, connections=32) as c, \
            agent.client() as pinger:
        sick = Domain(c, hangfs.mountpoint / "store")
        well = Domain(c, healthy_dir)
        await sick.setup("on hangfs")
        await well.setup("healthy")
        for d in (sick, well):
            await d.wait_state("ok", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)

        hangfs.hang()
        ping_task = asyncio.create_task(pings(pinger, 6.0))
        try:

            # Reported failing within one monitor interval and one I/O deadline.
            took = await sick.wait_state("failing", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)
            print(f"failing reported after {took:.2f} s")
            stats = await c.call("getStats")
            assert stats["domains"][sick.sd]["monitoring"]["state"] == "failing"
            assert stats["domains"][well.sd]["monitoring"]["state"] == "ok"

            # Operations on it end with a timeout code after their deadline,
            # all at once, and more of them than the domain's I/O threads.
            results = await asyncio.gather(
                *(fails_in_time("getVolumeInfo", sick.volume_info()) for _ in range(6)),
                fails_in_time("prepareImage", sick.prepare()),
                fails_in_time("createVolume", hung_job(sick)),
                fails_in_time("getStorageDomainStats",
                              c.call("getStorageDomainStats", sdUUID=sick.sd)),
                unreachable_in_time(c, sick))
            for what, code, elapsed in results:
                print(f"{what}: {code} after {elapsed:.2f} s")
                assert elapsed < HUNG_CALL_BOUND, (what, elapsed)

            # Meanwhile the healthy domain works as usual.
            start = time.monotonic()
            assert (await well.volume_info())["legality"] == "LEGAL"
            vol = new_id()
            info = await well.create_volume(new_id(), vol)
            assert info["status"] == "done", info
            assert (await well.prepare())["path"].endswith(well.vol)
            await well.teardown()
            assert time.monotonic() - start < 10
            assert await sick.state() == "failing"
            # Listing domains rescans every connection: the hung one costs
            # its deadline, the answer is still complete.
            start = time.monotonic()
            assert {sick.sd, well.sd} <= set(await c.call("getStorageDomainsList"))
            assert time.monotonic() - start < HUNG_CALL_BOUND

            lat = await ping_task
            # The hang lasted several monitor cycles; its reader that cannot be
            # killed is waited for, not joined by one more each cycle.
            assert agent.proc is not None
            assert len(children(agent.proc.pid, "dd", sick.sd)) == 1
            print(f"ping during the hang: {len(lat)} calls, p99 {1000 * p99(lat):.1f} ms, "
                  f"max {1000 * max(lat):.1f} ms")
            assert len(lat) > 50
            assert p99(lat) < 0.100
        finally:
            if not ping_task.done():
                ping_task.cancel()
            hangfs.release()

        # The storage is back: the same agent (no restart) reports it ok and
        # serves it again.
        took = await sick.wait_state("ok", 2 * (IO_TIMEOUT + MONITOR_INTERVAL) + 4.0 + SLACK)
        print(f"ok again {took:.2f} s after the release")
        assert agent.proc is not None and agent.proc.poll() is None
        assert (await sick.volume_info())["legality"] == "LEGAL"
        assert (await sick.prepare())["chain"][0]["volUUID"] == sick.vol
        await sick.teardown()
        info = await sick.create_volume(new_id(), new_id())
        assert info["status"] == "done", info
        stats = await c.call("getStats")
        assert stats["domains"][sick.sd]["monitoring"]["state"] == "ok"


async def test_stop_while_hung(agent_on_hangfs: AgentProcess, hangfs: HangFs):
    """SIGTERM while threads and a child of the agent are blocked on the hung
    storage: the agent's shutdown runs to its end in bounded time, and the
    process exits 0 as soon as the storage answers.

    Not sooner: a thread blocked on a FUSE request its server has read sleeps
    uninterruptibly, and a process cannot finish exiting while one of its
    threads does (NFS waits, by contrast, are killable)."""
    agent = agent_on_hangfs
    assert agent.proc is not None
    (hangfs.mountpoint / "store").mkdir()
    async with agent.client() as c:
        sick = Domain(c, hangfs.mountpoint / "store")
        await sick.setup("on hangfs")
        await sick.wait_state("ok", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)
        hangfs.hang()
        # Every I/O thread of the domain stuck, and the monitor's reader too.
        await asyncio.gather(*(fails_in_time("getVolumeInfo", sick.volume_info())
                               for _ in range(6)))
        await sick.wait_state("failing", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    # The monitor's stuck reader costs at most the runner's two kill grace periods.
    while "INFO agent.daemon [-] Stopped" not in agent.log():
        assert agent.proc.poll() is None, agent.log()[-3000:]
        assert time.monotonic() - start < 4.0 + 2 * SLACK, agent.log()[-3000:]
        await asyncio.sleep(0.1)
    print(f"shutdown done in {time.monotonic() - start:.2f} s")
    hangfs.release()
    assert agent.proc.wait(10) == 0, agent.log()[-3000:]
    agent.stop()




async def test_a_late_metadata_write_is_never_overtaken(agent_on_hangfs: AgentProcess,
                                                        hangfs: HangFs):
    """Writes hang, reads answer. updateVolume's metadata write fails at its
    deadline (851) and still lands once the storage answers: the kernel
    completes it. Meanwhile another updateVolume of the volume is refused at
    once, not written beside it (before, it waited its own deadline and the
    two landed in either order: one reported done could be undone); once
    the late write landed, the volume is updated again as usual."""
    agent = agent_on_hangfs
    (hangfs.mountpoint / "store").mkdir()
    async with agent.client() as c:
        d = Domain(c, hangfs.mountpoint / "store")
        await d.setup("on hangfs")
        ids = {"sdUUID": d.sd, "imgUUID": d.img, "volUUID": d.vol}
        hangfs.hang_writes()
        try:
            _, code, took = await fails_in_time(
                "updateVolume", c.call("updateVolume", **ids, description="first"))
            assert code == 851 and took >= IO_TIMEOUT, (code, took)
            start = time.monotonic()
            with pytest.raises(RpcError) as e:
                await c.call("updateVolume", **ids, description="second")
            took = time.monotonic() - start
            assert e.value.code == 851 and "has not returned" in e.value.message, e.value
            assert took < IO_TIMEOUT, took
            assert (await d.volume_info())["description"] == ""
        finally:
            hangfs.release()
        # the late write lands (the agent reads it), then writes are taken again
        deadline = time.monotonic() + 10
        while (await d.volume_info())["description"] != "first":
            assert time.monotonic() < deadline, "the late write did not land"
            await asyncio.sleep(0.05)
        while True:
            try:
                v = await c.call("updateVolume", **ids, description="third")
                break
            except RpcError as e:
                # the late write's return not delivered yet: within moments
                assert "has not returned" in e.message and time.monotonic() < deadline, e
                await asyncio.sleep(0.05)
        assert v["description"] == "third"
        assert (await d.volume_info())["description"] == "third"


async def test_a_late_ovf_store_write_holds_the_store(agent_on_hangfs: AgentProcess,
                                                      hangfs: HangFs):
    """Writes hang, reads answer: an OVF upload fails at its deadline (851)
    while its write goes on in the kernel, into the slot the next upload
    writes. Meanwhile the next upload is refused at once; once the storage
    answered, an upload is taken and reads back whole."""
    agent = agent_on_hangfs
    async with agent.client() as c:
        d = await OvfDomain(c, hangfs.mountpoint / "ovf").create()
        first = make_tar([(f"{new_id()}.ovf", b"1" * 5000)])
        r = await upload(c, agent, d.sd, first)
        assert r[0] == 200, r
        hangfs.hang_writes()
        try:
            start = time.monotonic()
            second = make_tar([(f"{new_id()}.ovf", b"2" * 300_000)])
            status, reply = await upload(c, agent, d.sd, second)
            assert status == 500 and reply["error"]["code"] == 851, (status, reply)
            assert time.monotonic() - start >= IO_TIMEOUT
            # refused at once, before any I/O: a read of the store waits
            # behind the hung write here (the FUSE kernel locks the file)
            start = time.monotonic()
            with pytest.raises(RpcError) as e:
                await upload(c, agent, d.sd, make_tar([(f"{new_id()}.ovf", b"3" * 9000)]))
            assert e.value.code == 851 and "has not returned" in e.value.message, e.value
            assert time.monotonic() - start < IO_TIMEOUT
        finally:
            hangfs.release()
        fourth = make_tar([(f"{new_id()}.ovf", b"4" * 7000)])
        deadline = time.monotonic() + 10
        while True:
            try:
                assert (await upload(c, agent, d.sd, fourth))[0] == 200
                break
            except RpcError as e:
                # the late write's return reaches the agent within moments
                assert "has not returned" in e.message and time.monotonic() < deadline, e
                await asyncio.sleep(0.05)
        assert await get(agent, d.sd) == (200, fourth)


# At start-up the agent waits this long for its connections, then answers.
CONNECT_WAIT = 1.0


async def two_domains_then_stop(agent: AgentProcess, hangfs: HangFs, tmp_path: Path,
                                connect_wait: float) -> tuple[Domain, Domain]:
    """Two active domains, one on hangfs (the hung domain, the healthy one);
    the agent stopped, its next start to wait `connect_wait` for them."""
    healthy_dir = tmp_path / "healthy"
    healthy_dir.mkdir()
    (hangfs.mountpoint / "store").mkdir()
    async with agent.client() as c:
        sick = Domain(c, hangfs.mountpoint / "store")
        well = Domain(c, healthy_dir)
        await sick.setup("on hangfs")
        await well.setup("healthy")
    agent.stop()
    (agent.state_dir / "hostagent.toml").write_text(f"{CONFIG}connect_wait = {connect_wait}\n")
    return sick, well


async def restart_hung(agent: AgentProcess, hangfs: HangFs,
                       agent_factory: Callable[..., AgentProcess],
                       tmp_path: Path) -> tuple[AgentProcess, Domain, Domain, float]:
    """Two active domains, one on hangfs; the agent stopped, the storage
    hung, the agent started again: (the agent, the hung domain, the healthy
    one, seconds until it was ready). The caller releases the storage."""
    sick, well = await two_domains_then_stop(agent, hangfs, tmp_path, CONNECT_WAIT)
    hangfs.hang()
    start = time.monotonic()
    agent = agent_factory(agent.state_dir, port=agent.port)
    ready = time.monotonic() - start
    print(f"ready {ready:.2f} s after the start, storage hung")
    return agent, sick, well, ready


async def connection(c: Client, conn_id: str) -> dict[str, Any]:
    return {x["id"]: x for x in await c.call("getStorageConnections")}[conn_id]


async def test_start_while_hung(agent_on_hangfs: AgentProcess, hangfs: HangFs,
                                agent_factory: Callable[..., AgentProcess], tmp_path: Path):
    """The agent started while an active domain's storage hangs (a host
    rebooted with its NFS server down): it answers after connect_wait,
    not after the hung connection's deadlines (a mount's can be minutes,
    past systemd's start timeout), serves the healthy domain and reports
    the hung connection as being re-established, its domain unknown (358).
    That ends failed; when the storage is back, the engine's
    connectStorageServer (sent to a host coming up) brings the domain back
    active and monitored, no activateStorageDomain needed."""
    try:
        agent, sick, well, ready = await restart_hung(agent_on_hangfs, hangfs, agent_factory,
                                                      tmp_path)
        # before: 12.5 s here (the check, then a reconnection, each cut at
        # its deadline with a child that cannot be killed)
        assert ready < HUNG_CALL_BOUND, ready
        async with Client.for_dev(agent.state_dir, port=agent.port) as c:
            sick.c = well.c = c
            conn = await connection(c, sick.conn["id"])
            assert conn["state"] == "disconnected" and "being" in conn["message"], conn
            assert (await connection(c, well.conn["id"]))["state"] == "connected"
            assert (await well.volume_info())["legality"] == "LEGAL"
            info = await well.create_volume(new_id(), new_id())
            assert info["status"] == "done", info
            t = time.monotonic()
            with pytest.raises(RpcError) as e:
                await sick.volume_info()
            assert e.value.code == 358 and time.monotonic() - t < 1.0, e.value
            stats = await c.call("getStats")
            assert stats["domains"][well.sd]["monitoring"]["state"] == "ok"
            assert sick.sd not in stats["domains"]
            t = time.monotonic()
            while (conn := await connection(c, sick.conn["id"]))["state"] != "failed":
                assert time.monotonic() - t < 2 * HUNG_CALL_BOUND + SLACK, conn
                await asyncio.sleep(0.2)
    finally:
        hangfs.release()
    async with Client.for_dev(agent.state_dir, port=agent.port) as c:
        sick.c = c
        [st] = await c.call("connectStorageServer", domType="localfs",
                            connectionParams=[sick.conn])
        assert st["status"] == 0, st
        took = await sick.wait_state("ok", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)
        print(f"ok {took:.2f} s after the reconnection")
        assert (await c.call("getStorageDomainInfo", sdUUID=sick.sd))["state"] == "active"
        assert (await sick.volume_info())["legality"] == "LEGAL"
        info = await sick.create_volume(new_id(), new_id())
        assert info["status"] == "done", info


async def test_storage_back_during_start(agent_on_hangfs: AgentProcess, hangfs: HangFs,
                                         agent_factory: Callable[..., AgentProcess],
                                         tmp_path: Path):
    """The same start, and the storage answers again while the agent is
    still re-establishing its connection: the connection comes up by
    itself and its active domain is found, activated and monitored with no
    call from the engine (getStats, which looks for no domain, lists it)."""
    try:
        agent, sick, _, ready = await restart_hung(agent_on_hangfs, hangfs, agent_factory,
                                                   tmp_path)
        assert ready < HUNG_CALL_BOUND, ready
        async with Client.for_dev(agent.state_dir, port=agent.port) as c:
            assert sick.sd not in (await c.call("getStats"))["domains"]
    finally:
        hangfs.release()
    async with Client.for_dev(agent.state_dir, port=agent.port) as c:
        sick.c = c
        t = time.monotonic()
        while (await c.call("getStats"))["domains"].get(sick.sd, {}).get(
                "monitoring", {}).get("state") != "ok":
            assert time.monotonic() - t < 2 * HUNG_CALL_BOUND + SLACK, agent.log()[-3000:]
            await asyncio.sleep(0.2)
        print(f"ok {time.monotonic() - t:.2f} s after the release, with no call")
        assert (await connection(c, sick.conn["id"]))["state"] == "connected"
        assert (await c.call("getStorageDomainInfo", sdUUID=sick.sd))["state"] == "active"
        info = await sick.create_volume(new_id(), new_id())
        assert info["status"] == "done", info


async def test_stop_during_start(agent_on_hangfs: AgentProcess, hangfs: HangFs,
                                 agent_factory: Callable[..., AgentProcess], tmp_path: Path):
    """SIGTERM (systemctl stop or restart) while the start waits for a
    connection to hung storage: the agent stops at once, never READY, not
    after storage.connect_wait (here a minute; with NFS down a mount's
    deadline). The next start finds everything as it was."""
    agent = agent_on_hangfs
    sick, well = await two_domains_then_stop(agent, hangfs, tmp_path, 60)
    try:
        hangfs.hang()
        agent = agent_factory(agent.state_dir, port=agent.port, start=False)
        earlier = agent.log_path.stat().st_size     # the log file is the last agent's too
        # the start under way: it asks systemd for more time
        agent.start(until="EXTEND_TIMEOUT_USEC=60000000")
        assert agent.proc is not None
        start = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        while b"INFO agent.daemon [-] Stopped" not in agent.log_path.read_bytes()[earlier:]:
            assert agent.proc.poll() is None, agent.log()[-3000:]
            assert time.monotonic() - start < 2.0 + SLACK, agent.log()[-3000:]
            await asyncio.sleep(0.1)
        print(f"stopped {time.monotonic() - start:.2f} s after SIGTERM, during the start")
        assert not agent.wait_notify("READY=1", 0), agent.notifications
    finally:
        hangfs.release()
    assert agent.proc.wait(10) == 0, agent.log()[-3000:]
    agent.stop()
    (agent.state_dir / "hostagent.toml").write_text(CONFIG)
    agent = agent_factory(agent.state_dir, port=agent.port)
    async with agent.client() as c:
        for d in (sick, well):
            d.c = c
            await d.wait_state("ok", IO_TIMEOUT + MONITOR_INTERVAL + SLACK)
            assert (await d.volume_info())["legality"] == "LEGAL"
