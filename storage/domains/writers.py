"""The agent watching a VM's writer of a thin volume through QMP
(prepareImage's `writer`): the write threshold armed on the node that opens
the volume, an extension on each BLOCK_WRITE_THRESHOLD event, the threshold
re-armed, a writer paused on ENOSPC resumed.

The writer's monitor socket may appear after prepareImage (disks are
prepared before their VM starts) and go away and come back (the writer
restarts): the watch connects whenever it is there, until it is stopped
(teardownImage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from storage.errors import HostAgentError, VolumeIsBusy
from storage.qmp import DEFAULT_TIMEOUT, QMPClient, QMPError
from storage.thin import ThinPolicy

log = logging.getLogger("storage.writers")

# How often a missing socket is looked for, or a connection tried again;
# the first retry of a failed extension.
RETRY_INTERVAL = 1.0
# A failing extension (a full VG) is asked again after RETRY_INTERVAL,
# doubling up to this: each attempt is an lvextend under the domain lease
# (most of a second of LVM in a loaded host, every watch of the VG doing
# the same), and every second of it came to nothing. Space freed on this
# host (a volume deleted, the domain extended, a PV resized) wakes the
# watches at once (VolumeOps.space_freed); space freed by another host is
# seen within this bound.
RETRY_CAP = 8.0


class Extend(Protocol):
    """Grow the volume to at least `min_size`; its size afterwards.
    `report`: a failure is told (notification, metric): the first of a
    run of failures, not every retry."""

    def __call__(self, min_size: int, *, report: bool = True) -> Awaitable[int]: ...


@dataclass(frozen=True)
class Backoff:
    first: float = RETRY_INTERVAL
    cap: float = RETRY_CAP

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1, 2, ...)."""
        return min(self.cap, self.first * float(1 << min(failures - 1, 32)))


class Link:
    """The agent's one connection to a writer's QMP monitor, shared by the
    watches of every disk that writer holds (a monitor serves one client at
    a time: a connection per disk would leave all but one waiting).
    Connects whenever the socket is there, until its last watch leaves."""

    def __init__(self, path: str, retry_interval: float = RETRY_INTERVAL,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.retry_interval = retry_interval
        self.timeout = timeout      # of a reply
        self.qmp: QMPClient | None = None
        self.connected = asyncio.Event()
        self._watches: set[WriterWatch] = set()
        self._sessions: dict[WriterWatch, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return not self._watches

    def attach(self, watch: WriterWatch) -> None:
        self._watches.add(watch)
        if self.qmp is not None:
            self._start_session(watch, self.qmp)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"writer link {self.path}")

    async def detach(self, watch: WriterWatch) -> None:
        self._watches.discard(watch)
        await _cancel(self._sessions.pop(watch, None))
        if not self._watches:
            task, self._task = self._task, None
            await _cancel(task)

    def _start_session(self, watch: WriterWatch, qmp: QMPClient) -> None:
        watch.events = asyncio.Queue()
        self._sessions[watch] = asyncio.create_task(watch.session(qmp),
                                                    name=f"writer {watch.name}")

    async def _run(self) -> None:
        while True:
            try:
                async with QMPClient(self.path, timeout=self.timeout) as qmp:
                    self.qmp = qmp
                    self.connected.set()
                    log.info("Writer %s: connected", self.path)
                    for watch in list(self._watches):
                        self._start_session(watch, qmp)
                    while True:
                        ev = await qmp.next_event()
                        for watch in self._sessions:
                            watch.events.put_nowait(ev)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                # not started yet, or gone: looked for again
                log.debug("Writer %s: %s", self.path, e)
            except (TimeoutError, OSError, QMPError) as e:
                log.info("Writer %s: %s (connecting again)", self.path, e)
            finally:
                self.qmp = None
                self.connected.clear()
                sessions, self._sessions = self._sessions, {}
                for task in sessions.values():
                    await _cancel(task)
            await asyncio.sleep(self.retry_interval)


def _sent(ev: dict[str, Any]) -> float | None:
    """When qemu sent an event (its "timestamp", the wall clock)."""
    stamp = ev.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    try:
        return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


async def _cancel(task: asyncio.Task[None] | None) -> None:
    # not `await task` under suppress(CancelledError): that would swallow a
    # cancellation of the caller arriving here
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1)


class WriterWatch:
    """One disk's writer: the threshold on its protocol node, through the
    link to the writer's monitor (its own link unless one is given)."""

    def __init__(self, name: str, qmp_socket: str, node: str, thin: ThinPolicy, *,
                 current: Callable[[], Awaitable[int]], extend: Extend,
                 retry_interval: float = RETRY_INTERVAL, link: Link | None = None,
                 backoff: Backoff | None = None) -> None:
        self.name = name
        self.qmp_socket = qmp_socket
        self.node = node
        self.thin = thin
        self._current = current
        self._extend = extend
        self.retry_interval = retry_interval
        self.link = link or Link(qmp_socket, retry_interval)
        self.backoff = backoff or Backoff(first=retry_interval)
        self.size = 0
        # set when space may have come back: a failing extension tries again now
        self._wake = asyncio.Event()
        # set while the watch runs on a connection to the writer
        self.connected = asyncio.Event()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @property
    def qmp(self) -> QMPClient | None:
        return self.link.qmp

    def start(self) -> WriterWatch:
        self.link.attach(self)
        return self

    async def stop(self) -> None:
        await self.link.detach(self)

    def wake(self) -> None:
        """Space may have come back (freed or added on this host): a failing
        extension is tried again now rather than after its backoff."""
        self._wake.set()

    async def session(self, qmp: QMPClient) -> None:
        """Watch on one connection (cancelled when it closes)."""
        try:
            while True:
                try:
                    self.connected.set()
                    log.info("Writer of %s: watching node %s through %s", self.name,
                             self.node, self.qmp_socket)
                    await self._watch(qmp)
                except QMPError as e:
                    if qmp.closed.is_set():
                        return
                    # the node not there yet (the VM starting)
                    log.info("Writer of %s: %s (trying again)", self.name, e)
                except HostAgentError as e:
                    # the volume's size unknown for now (its domain not active
                    # yet after a restart, the storage failing): tried again
                    log.warning("Writer of %s: %s (trying again)", self.name, e.message)
                await asyncio.sleep(self.retry_interval)
        finally:
            self.connected.clear()

    async def _watch(self, qmp: QMPClient) -> None:
        self.size = await self._current()
        # the writer may be past the threshold already (it ran before the
        # agent connected): extend at once rather than wait for a write
        await self._arm(qmp)
        highest = await self._highest_offset(qmp)
        if highest is not None and highest > self.thin.threshold(self.size):
            await self._grow(qmp, highest)
        while True:
            ev = await self.events.get()
            data: dict[str, Any] = ev.get("data") or {}
            if ev.get("event") == "BLOCK_WRITE_THRESHOLD" and data.get("node-name") == self.node:
                allocation = int(data["write-threshold"]) + int(data["amount-exceeded"])
                # An event the watch already answered: the writes it reports
                # crossed the threshold armed on connecting while the watch
                # grew past them (it saw them in the stats), and re-armed.
                # Answered again, it grew the volume a chunk more for nothing.
                if allocation > self.thin.threshold(self.size):
                    await self._grow(qmp, allocation, sent=_sent(ev))
            elif ev.get("event") == "BLOCK_IO_ERROR" and data.get("nospace"):
                # a VM paused on ENOSPC (werror=enospc): the threshold came
                # too late, for this disk if it is past its threshold (the
                # event names the VM's device, not this node)
                highest = await self._highest_offset(qmp)
                if highest is not None and highest > self.thin.threshold(self.size):
                    await self._grow(qmp, highest)

    async def _grow(self, qmp: QMPClient, allocation: int, sent: float | None = None) -> None:
        """Extend until it works, re-arm, resume. `sent`: when the writer
        sent the event (its QMP timestamp, wall clock), to tell how long it
        waited before the watch handled it."""
        started = time.monotonic()
        waited = f", {time.time() - sent:.3f} s after the writer sent it" if sent else ""
        old = self.size
        want = self.thin.next_size(old, allocation)
        log.debug("Writer of %s: writes at %d%s: extending to %d", self.name, allocation,
                  waited, want)
        # The next threshold is armed while the LV grows, not after it: a
        # QMP round trip to a busy writer (0.04-0.12 s in the lab guest)
        # off every extension's latency (issue 15). Safe before the LV is
        # larger: the writer cannot write past the old end meanwhile, so
        # the event cannot come early; qemu does not check a threshold
        # against the node's size. The extension is never cancelled for
        # the arm's sake (an lvextend killed half-way may leave the LV
        # suspended): a failed arm is raised after it.
        ahead = self.thin.threshold(want)
        arming = asyncio.create_task(self._arm(qmp, ahead))
        try:
            await self._extend_retrying(want)
        except BaseException:
            arming.cancel()
            raise
        await arming
        if self.size > old:
            if self.thin.threshold(self.size) != ahead:
                # LVM gave another size than asked (whole extents, the full
                # capacity, another host grew it further): armed again
                log.debug("Writer of %s: extended to %d, not %d: re-arming", self.name,
                          self.size, want)
                await self._arm(qmp)
            log.info("Writer of %s: extended from %d to %d, threshold re-armed %.3f s after "
                     "the event", self.name, old, self.size, time.monotonic() - started)
        else:
            # as large as the full capacity needs: nothing more to watch
            log.info("Writer of %s: at its full size %d", self.name, self.size)
        await self._resume(qmp)

    async def _extend_retrying(self, want: int) -> None:
        """Extend to `want`; while it fails (a full VG), again after a
        growing delay (Backoff), or at once when woken (space freed on this
        host). Only the first failure is told (volume.extendFailed, the
        metric); the recovery is the volume.extended of the extension."""
        failures = 0
        failed_at = 0.0
        while True:
            # cleared before the attempt: space freed while it fails wakes the wait
            self._wake.clear()
            try:
                self.size = await self._extend(want, report=failures == 0)
                break
            except HostAgentError as e:
                failures += 1
                delay = self.backoff.delay(failures)
                if failures == 1:
                    failed_at = time.monotonic()
                    log.warning("Writer of %s: extending to %d failed: %s (asking again "
                                "in %.1f s, then less often up to every %.1f s, at once when "
                                "space is freed on this host)", self.name, want, e.message,
                                delay, self.backoff.cap)
                else:
                    log.info("Writer of %s: extending to %d failed (%d times): %s",
                             self.name, want, failures, e.message)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        if failures:
            log.warning("Writer of %s: extended to %d after %d failures over %.1f s",
                        self.name, self.size, failures, time.monotonic() - failed_at)

    async def _arm(self, qmp: QMPClient, threshold: int | None = None) -> None:
        """Arm the threshold of the LV's current size, or `threshold`."""
        if threshold is None:
            threshold = self.thin.threshold(self.size)
        started = time.monotonic()
        await qmp.execute("block-set-write-threshold",
                          {"node-name": self.node, "write-threshold": threshold})
        log.debug("Writer of %s: threshold %d armed in %.3f s", self.name, threshold,
                  time.monotonic() - started)

    async def _highest_offset(self, qmp: QMPClient) -> int | None:
        for s in await qmp.execute("query-blockstats", {"query-nodes": True}):
            if s.get("node-name") == self.node:
                return int(s["stats"]["wr_highest_offset"])
        return None

    async def _resume(self, qmp: QMPClient) -> None:
        """`cont` a VM paused by an I/O error (ENOSPC); qemu-storage-daemon
        has no run state and never pauses."""
        try:
            status = await qmp.execute("query-status")
        except QMPError as e:
            if e.error_class == "CommandNotFound":
                return
            raise
        if status.get("status") == "io-error":
            log.info("Writer of %s: resuming the VM paused on an I/O error", self.name)
            await qmp.execute("cont")


# How long a live snapshot waits for the agent's connection to a writer.
CONNECT_WAIT = 10.0


class SwitchUncertain(VolumeIsBusy):
    """The switch's transaction went unanswered: the writer may hold the new
    layers. They stay (and the switch's record: the restarted agent asks the
    writer), rather than a layer a VM writes removed."""


@dataclass(frozen=True)
class Switch:
    """One disk of a live snapshot: its writer, onto the new layer at `path`
    (a qcow2 over the writer's current top, made and prepared already)."""

    watch: WriterWatch
    disk: str           # named in errors: "disks[0]"
    path: str
    vol: str            # the new layer's volume: its node names


async def switch_writers(switches: list[Switch]) -> list[str]:
    """Put each writer onto its new layer in one QMP `transaction` of
    `blockdev-snapshot` actions (all disks or none): each overlay is opened
    first (`blockdev-add`, with no backing: the snapshot action makes the
    writer's top its backing and moves every user of the top onto it), so
    after the transaction no write reaches the old layers. Returns the new
    protocol nodes (the watches' nodes from now on). On failure the
    overlays opened are closed again and the writers are unchanged.

    As libvirt's external snapshots with -blockdev (qemuSnapshotDiskPrepare
    ... qemuBlockSnapshotAddBlockdev)."""
    if not switches:
        return []
    sockets = {s.watch.qmp_socket for s in switches}
    if len(sockets) > 1:
        raise VolumeIsBusy(resource=", ".join(s.disk for s in switches),
                           reason="their writers are different processes "
                                  f"({', '.join(sorted(sockets))}): one transaction "
                                  "switches the disks of one VM")
    watch = switches[0].watch
    qmp = await _monitor(watch, ", ".join(s.disk for s in switches),
                         "the new layers cannot be switched to")
    try:
        nodes = {n["node-name"]: n for n in
                 await qmp.execute("query-named-block-nodes", {"flat": True})}
        # the one query that names each node's parents (qemu 4.0 and later;
        # "x-debug" but unchanged since)
        graph = await qmp.execute("x-debug-query-block-graph")
        added: list[str] = []
        actions: list[dict[str, Any]] = []
        tops: list[tuple[str, str]] = []
        try:
            for s in switches:
                proto = nodes.get(s.watch.node)
                if proto is None:
                    raise VolumeIsBusy(resource=s.disk,
                                       reason=f"the writer has no node {s.watch.node}")
                top = _format_node(graph, s.watch.node)
                _preflight(graph, nodes, s, top)
                cache = proto.get("cache") or {}
                file_node, fmt_node = layer_nodes(s.vol)
                await qmp.execute("blockdev-add", {
                    "driver": proto["drv"], "node-name": file_node, "filename": s.path,
                    "cache": {"direct": bool(cache.get("direct")),
                              "no-flush": bool(cache.get("no-flush"))}})
                added.append(file_node)
                await qmp.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": fmt_node, "file": file_node,
                    "backing": None})
                added.append(fmt_node)
                actions.append({"type": "blockdev-snapshot",
                                "data": {"node": top, "overlay": fmt_node}})
                tops.append((top, fmt_node))
            # The bitmaps' adds before the snapshots (an add can fail on
            # storage: then no snapshot was prepared, none is aborted, see
            # _preflight), their merges after them: a snapshot's prepare
            # drains the old top and holds it drained, so the merge sees
            # every write it took (a merge before it would miss a write in
            # flight: an add polls, and writes go on meanwhile). A merge
            # fails only on a busy or inconsistent bitmap: _preflight refused
            # the first, the second is not carried.
            adds, merges = await _carry_bitmaps(qmp, nodes, tops)
            await _transaction(qmp, [*adds, *actions, *merges], switches, added,
                               [overlay for _, overlay in tops])
        except BaseException:
            for node in reversed(added):
                try:
                    await qmp.execute("blockdev-del", {"node-name": node})
                except QMPError as e:
                    log.error("Live snapshot: cannot close node %s: %s", node, e)
            raise
    except QMPError as e:
        raise VolumeIsBusy(resource=", ".join(s.disk for s in switches),
                           reason=f"the writer refused the switch onto the new layers: "
                                  f"{e}") from None
    log.info("Live snapshot: %s switched onto %s in one transaction", watch.qmp_socket,
             ", ".join(s.path for s in switches))
    return [layer_nodes(s.vol)[0] for s in switches]


async def _monitor(watch: WriterWatch, disk: str, then: str) -> QMPClient:
    """The agent's connection to a writer's monitor, waited for a while."""
    try:
        async with asyncio.timeout(CONNECT_WAIT):
            await watch.connected.wait()
    except TimeoutError:
        raise VolumeIsBusy(resource=disk, reason=f"the writer's QMP monitor "
                                                 f"{watch.qmp_socket} is not reachable: "
                                                 f"{then}") from None
    qmp = watch.qmp
    assert qmp is not None
    return qmp


async def held_bitmaps(watch: WriterWatch, disk: str) -> set[str]:
    """The persistent dirty bitmaps a writer holds on its top (the format
    node over the watched node), recording and consistent. While it runs,
    their copies on storage are flagged in-use and stale: the writer stores
    them when the snapshot's transaction makes that top its backing (qemu
    reopens the old top read-only: external_snapshot_commit ->
    bdrv_reopen_set_read_only -> qcow2_reopen_bitmaps_ro)."""
    qmp = await _monitor(watch, disk, "its dirty bitmaps cannot be checked")
    try:
        top = _format_node(await qmp.execute("x-debug-query-block-graph"), watch.node)
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    except QMPError as e:
        raise VolumeIsBusy(resource=disk, reason=f"the writer cannot list its dirty "
                                                 f"bitmaps: {e}") from None
    return {b["name"] for n in nodes if n.get("node-name") == top
            for b in n.get("dirty-bitmaps") or []
            if b.get("persistent") and b.get("recording", True)
            and not b.get("inconsistent")}


async def _transaction(qmp: QMPClient, actions: list[dict[str, Any]],
                       switches: list[Switch], added: list[str],
                       overlays: list[str]) -> None:
    """Run the switch's transaction. An error reply: it did nothing (and no
    write went to an overlay: checked). No reply (timeout, connection lost):
    the writer may be on the new layers; what it opened stays (`added`
    emptied), and so must the layers (SwitchUncertain)."""
    uncertain: Exception | None = None
    try:
        await qmp.execute("transaction", {"actions": actions})
    except QMPError as e:
        if e.error_class:
            await _no_write_in(qmp, overlays, switches, e)
            raise
        uncertain = e
    except TimeoutError as e:
        uncertain = e
    if uncertain is not None:
        added.clear()
        raise SwitchUncertain(resource=", ".join(s.disk for s in switches),
                              reason=f"the writer did not answer the switch onto "
                                     f"the new layers ({uncertain}): they are kept")


async def _no_write_in(qmp: QMPClient, overlays: list[str], switches: list[Switch],
                       error: QMPError) -> None:
    """After a failed transaction: did a write reach an overlay before qemu
    aborted the snapshot that put it over the top? (qemu counts the highest
    offset written per node.) Such a write is not in the disk the VM goes on
    with: said loudly, never passed over as a plain refusal."""
    try:
        stats = await qmp.execute("query-blockstats", {"query-nodes": True})
    except QMPError as e:
        log.warning("Live snapshot: cannot ask the writer what reached the overlays: %s", e)
        return
    written = {st.get("node-name"): st.get("stats", {}).get("wr_highest_offset", 0)
               for st in stats}
    hit = [s.disk for s, node in zip(switches, overlays, strict=True) if written.get(node)]
    if hit:
        log.error("Live snapshot: the writer %s failed the switch (%s) after writing into "
                  "the new layer of %s: a write it reported done is not in the disk",
                  switches[0].watch.qmp_socket, error, ", ".join(hit))
        raise VolumeIsBusy(resource=", ".join(hit),
                           reason=f"the writer refused the switch onto the new layers "
                                  f"({error}) after a write reached the new layer it gave "
                                  "up: that write is not in the disk the VM goes on with; "
                                  "check the VM's data")


async def _carry_bitmaps(qmp: QMPClient, nodes: dict[str, dict[str, Any]],
                         tops: list[tuple[str, str]]
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Actions giving each overlay the persistent dirty bitmaps of the top
    it goes over (the writer holds them: the copy on storage is stale while
    it runs), merged in the same transaction, as libvirt does: (adds,
    merges). A name the overlay has already (a backup's own, added when it
    was made) is left; an inconsistent bitmap (qemu refuses to merge it, and
    no backup can use it) is not carried."""
    have = {n["node-name"]: {b.get("name") for b in n.get("dirty-bitmaps") or []}
            for n in await qmp.execute("query-named-block-nodes", {"flat": True})}
    adds: list[dict[str, Any]] = []
    merges: list[dict[str, Any]] = []
    for top, overlay in tops:
        for bm in nodes[top].get("dirty-bitmaps") or []:
            if not bm.get("persistent") or bm["name"] in have.get(overlay, set()):
                continue
            if bm.get("inconsistent"):
                log.warning("Live snapshot: dirty bitmap %s of %s is inconsistent: "
                            "not carried onto %s", bm["name"], top, overlay)
                continue
            adds.append({"type": "block-dirty-bitmap-add",
                         "data": {"node": overlay, "name": bm["name"], "persistent": True,
                                  "granularity": bm["granularity"],
                                  "disabled": not bm.get("recording", True)}})
            merges.append({"type": "block-dirty-bitmap-merge",
                           "data": {"node": overlay, "target": bm["name"],
                                    "bitmaps": [{"node": top, "name": bm["name"]}]}})
    return adds, merges


def _preflight(graph: dict[str, Any], nodes: dict[str, dict[str, Any]], s: Switch,
               top: str) -> None:
    """Refuse, before the transaction, a disk whose switch would fail inside
    it. A failing action makes qemu abort the snapshots prepared before it,
    and with a filter between the VM's device and the top (a throttle node:
    the VM's I/O limits) qemu 7.2's abort lets a write held during the
    transaction into the overlay it then drops: the VM was told it is done,
    the disk does not have it. Measured in the lab guest (three qcow2 disks
    on LVs under one throttle group, written through NBD, 40 transactions
    failing on a busy bitmap after three prepared snapshots: 113 of the 120
    aborted overlays took writes; with no filter, 0 of 200). So every
    failure the agent can foresee is refused here, and a write that still
    reaches an aborted overlay is said (_no_write_in). A
    block job on the top or a filter over it blocks a snapshot of it (qemu's
    op blockers); a
    busy dirty bitmap (an NBD export or a backup job reads it) cannot be
    merged into the new layer."""
    ids = {n["id"]: n for n in graph["nodes"]}
    # the top and the filters over it (a backup job puts its
    # copy-before-write filter between the top and the VM's device)
    over = {i for i, n in ids.items() if n.get("name") == top}
    while more := {e["parent"] for e in graph["edges"] if e["child"] in over
                   and ids.get(e["parent"], {}).get("type") == "block-driver"} - over:
        over |= more
    jobs = sorted({str(ids[e["parent"]].get("name")) for e in graph["edges"]
                   if e["child"] in over
                   and ids.get(e["parent"], {}).get("type") == "block-job"})
    if jobs:
        raise VolumeIsBusy(resource=s.disk,
                           reason=f"the writer runs block job {', '.join(jobs)} on it: "
                                  "snapshot it when the job has ended")
    busy = sorted(b["name"] for b in nodes[top].get("dirty-bitmaps") or []
                  if b.get("persistent") and b.get("busy"))
    if busy:
        raise VolumeIsBusy(resource=s.disk,
                           reason=f"its dirty bitmap {', '.join(busy)} is in use in the "
                                  "writer (an export or a backup job reads it): it cannot "
                                  "be carried onto the new layer now")


def layer_nodes(vol: str) -> tuple[str, str]:
    """The protocol and format node names a live snapshot gives a new layer
    in its writer (unique per volume, known before the switch: a restart
    asks the writer whether they are there)."""
    prefix = "ha-" + vol.replace("-", "")[:16]
    return f"{prefix}-file", f"{prefix}-fmt"


async def switched(qmp_socket: str, vol: str, timeout: float = 5.0) -> bool | None:
    """Whether a writer holds the new layer `vol` (a live snapshot cut by a
    crash: did its transaction happen?); None if the writer cannot be asked
    (not running)."""
    file_node, fmt_node = layer_nodes(vol)
    try:
        async with QMPClient(qmp_socket, timeout=timeout) as qmp:
            nodes = {n["node-name"]: n for n in
                     await qmp.execute("query-named-block-nodes", {"flat": True})}
            # switched onto: its backing attached (a node's info says nothing
            # of it: backing_file is the header's, backing_file_depth 0)
            graph = await qmp.execute("x-debug-query-block-graph")
            ids = {n["id"] for n in graph["nodes"] if n.get("name") == fmt_node}
            if any(e["parent"] in ids and e["name"] == "backing" for e in graph["edges"]):
                return True
            # opened before the transaction, never switched onto: closed
            for node in (fmt_node, file_node):
                if node in nodes:
                    await qmp.execute("blockdev-del", {"node-name": node})
            return False
    except (OSError, TimeoutError, QMPError) as e:
        log.warning("Writer %s: cannot ask it about layer %s: %s", qmp_socket, vol, e)
        return None


def _format_node(graph: dict[str, Any], proto: str) -> str:
    """The format node over a protocol node: the writer's top, which the
    snapshot goes over. Read from the block graph (its `file` parent): a
    node's filename does not tell (a snapshot overlay's is a json: string);
    the protocol node itself when a writer uses a raw volume with no format
    node."""
    names = {n["id"]: n for n in graph["nodes"]}
    ids = [i for i, n in names.items() if n.get("name") == proto]
    parents = [str(names[e["parent"]]["name"]) for e in graph["edges"]
               if e["child"] in ids and e["name"] == "file"
               and names[e["parent"]].get("type") == "block-driver"]
    if len(parents) > 1:
        raise QMPError(f"node {proto} has {len(parents)} format nodes: {parents}")
    return parents[0] if parents else proto
