"""Disk transfers in and out of the host (ovirt-imageio's protocol): tickets,
and the life of each transfer's volume while its ticket is open.

A transfer is one volume of one domain, read (download) or written (upload),
in the format the client sees: `raw`, the guest's view of the volume and its
chain through qemu-nbd, or `qcow2`, the volume's file as it is (a cow
volume's qcow2 file; an upload's file gets room for the largest qcow2 of its
virtual size, and is cut at the image's end once checked). For its whole
life one task of the agent (`_life`) holds the volume's lease, keeps the
chain active (block: LVs) and runs qemu-nbd on a private UNIX socket through
the command runner; the data listener's threads talk NBD to that socket
(storage/nbdclient.py). The ticket (random, single volume, expiring, closed
on finalize or cancel) is the data path's only credential.

An upload's volume is ILLEGAL from startTransfer until finalizeTransfer has
checked what was written (`qemu-img info` under resource limits, the format
and backing file the metadata records, the virtual size, `qemu-img check`);
then LEGAL with a new generation, in one metadata write under the lease.
cancelTransfer removes an upload's volume. A crash leaves no lease (it dies
with the process) and nothing recorded as prepared; each transfer is a job
(agent/transferjobs.py) whose record is on disk before the volume changes,
and its recovery at the next start (recover) deactivates what the transfer
had active and removes an upload left ILLEGAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from storage import commands, qemuimg
from storage.domains import Domain
from storage.domains.volumes import VolumeOps
from storage.errors import (
    HostAgentError,
    ImageVerificationError,
    InvalidParameter,
    TransferDoesNotExist,
    TransferTicketError,
    VolumeImageHasChildren,
    VolumeIsBusy,
)
from storage.metadata import ILLEGAL, LEGAL, READY, VolumeFormat, VolumeMetadata
from storage.nbd import NbdError
from storage.nbdclient import NbdClient

log = logging.getLogger("storage.transfers")

NBD_START = 30.0          # s for qemu-nbd to listen
DRAIN = 30.0              # s requests under way get once a transfer closes
PROGRESS_INTERVAL = 1.0   # s between transfer.progress notifications of one transfer
KEEP_CLOSED = 3600.0      # s a closed transfer stays visible to getTransfer
# connections one qemu-nbd serves at once: the data listener's, plus extents
NBD_CLIENTS = 20
# a backing file name in another image of the domain: ../<image uuid>/<volume uuid>
TEMPLATE_BACKING = re.compile(r"\.\./[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                              r"[0-9a-f]{12}/[0-9a-f-]{36}")


@dataclass(frozen=True)
class TicketLimits:
    """A ticket's lifetime, and its inactivity timeout: the default and the
    most a startTransfer may ask (the agent's [transfers] settings)."""

    ticket_lifetime: float = 24 * 3600.0
    inactivity_timeout: float = 60.0
    max_inactivity_timeout: float = 24 * 3600.0

    def inactivity(self, asked: float | None) -> float:
        if asked is None:
            return self.inactivity_timeout
        if asked > self.max_inactivity_timeout:
            raise InvalidParameter(field="inactivityTimeout",
                                   reason=f"more than {self.max_inactivity_timeout:g} s "
                                          "(transfers.max_inactivity_timeout)")
        return asked


@dataclass(eq=False)
class Transfer:
    id: str                   # public: getTransfer, logs
    ticket: str               # secret: the url's credential, never logged
    sd: str
    img: str
    vol: str
    direction: str            # "upload" | "download"
    format: str               # "raw" | "qcow2"
    dirty: str | None
    inactivity: float
    expires: float            # wall clock, as reported to the engine
    # monotonic: what decides; a step of the wall clock (NTP, an admin)
    # neither ends a ticket early nor keeps one alive
    deadline: float
    domain: Domain
    md: VolumeMetadata
    # starting, open, finalizing, cancelling; then finished, cancelled, expired or failed
    state: str = "starting"
    transferred: int = 0
    active: int = 0           # requests under way
    last_activity: float = field(default_factory=time.monotonic)
    error: HostAgentError | None = None
    sock: str = ""
    # The export is the volume's file as it is (a raw volume, or format qcow2):
    # reads and writes go to `path` directly, without qemu-nbd's copy; zero,
    # flush and extents still through qemu-nbd (one page cache: coherent).
    path: str = ""
    direct: bool = False
    size: int = 0
    closed_at: float | None = None
    opened: bool = False      # transfer.state "open" was published
    notified: float = 0.0     # monotonic time of the last notification
    _extents: list[dict[str, Any]] | None = None
    # percent done, for the transfer's job (set by its job's work)
    on_progress: Callable[[float], None] | None = None
    # set when the transfer's life is over (closed, volume released)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def writable(self) -> bool:
        return self.direction == "upload"

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"transferId": self.id, "direction": self.direction,
                               "format": self.format, "sdUUID": self.sd, "imgUUID": self.img,
                               "volUUID": self.vol, "state": self.state,
                               "active": self.state == "open", "transferred": self.transferred,
                               "expires": self.expires, "inactivityTimeout": self.inactivity}
        if self.error is not None:
            out["error"] = {"code": self.error.code, "message": self.error.message}
        return out


class TransferService:
    def __init__(self, volumes: VolumeOps, *,
                 publish: Callable[[str, dict[str, Any]], None] | None = None,
                 count_bytes: Callable[[str, int], None] | None = None,
                 limits: TicketLimits | None = None,
                 runner: commands.Runner = commands.run) -> None:
        """publish(method, params): a notification; count_bytes(direction, n):
        the metric (both wired by agent.context)."""
        self.volumes = volumes
        self.domains = volumes.registry
        self.prepared = volumes.prepared
        self.publish = publish
        self.count_bytes = count_bytes
        self.limits = limits or TicketLimits()
        self.runner = runner
        self.transfers: dict[str, Transfer] = {}
        self.tickets: dict[str, Transfer] = {}     # by ticket, while open
        # track(t): make t a job whose record is on disk before the volume
        # changes (agent/transferjobs.py sets it), so a crash is recovered
        self.track: Callable[[Transfer], Awaitable[None]] | None = None
        # The port of the data listener once it listens (set by the edge).
        self.data_port: int | None = None

    # ---- verbs ---------------------------------------------------------------------------

    async def start(self, sd: str, img: str, vol: str, direction: str, fmt: str,
                    dirty: str | None, inactivity: float | None) -> Transfer:
        """inactivity: seconds without a request before the ticket closes
        (None: the configured default)."""
        self._prune()
        inactivity = self.limits.inactivity(inactivity)
        if dirty is not None:
            commands.check_arg(dirty, "dirty")
            if fmt != "raw":
                raise InvalidParameter(field="dirty", reason="needs format raw")
        domain = await self.domains.active_domain(sd)
        await domain.refuse_ovf_store(img, vol)
        md = await domain.volume(img, vol)
        for t in self.transfers.values():
            if t.sd == sd and t.vol == vol and t.closed_at is None:
                raise VolumeIsBusy(resource=f"volume {vol}",
                                   reason=f"transfer {t.id} is open on it")
        if direction == "upload":
            if self.prepared.is_prepared(sd, img):
                # a VM (or a reader) has the image: writing under it corrupts what it reads
                raise VolumeIsBusy(resource=f"image {img}", reason="it is prepared")
            if await domain.children(md):
                raise VolumeImageHasChildren(resource=f"volume {vol}",
                                             reason="an upload would change what its "
                                                    "children read")
            if md.legality != LEGAL or md.state != READY:
                raise InvalidParameter(field="volUUID", reason="not a complete LEGAL volume")
            if fmt == "qcow2" and md.format != "COW":
                raise InvalidParameter(field="format", reason="a qcow2 file goes into a cow "
                                                              "volume")
        else:
            for m in await domain.chain(img, vol):
                if m.legality != LEGAL or m.state != READY:
                    raise InvalidParameter(field="volUUID",
                                           reason=f"volume {m.uuid} of the chain is not LEGAL")
        t = Transfer(id=str(uuid.uuid4()), ticket=secrets.token_urlsafe(24), sd=sd, img=img,
                     vol=vol, direction=direction, format=fmt, dirty=dirty, inactivity=inactivity,
                     expires=time.time() + self.limits.ticket_lifetime,
                     deadline=time.monotonic() + self.limits.ticket_lifetime, domain=domain,
                     md=md)
        self.transfers[t.id] = t
        self.tickets[t.ticket] = t
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            if self.track is not None:
                await self.track(t)
            t._task = asyncio.create_task(self._life(t, ready), name=f"transfer-{t.id}")
            t._task.add_done_callback(lambda _: t.closed.set())
            await asyncio.shield(ready)
        except BaseException:
            if t._task is None:
                t.closed.set()
            del self.transfers[t.id]
            del self.tickets[t.ticket]
            raise
        log.info("Transfer %s: %s of %s/%s/%s as %s opened", t.id, direction, sd, img,
                 vol, fmt)
        self._publish(t)
        return t

    def get(self, transfer_id: str) -> Transfer:
        t = self.transfers.get(transfer_id)
        if t is None:
            raise TransferDoesNotExist(transferId=transfer_id)
        return t

    async def finalize(self, transfer_id: str) -> dict[str, Any]:
        t = self.get(transfer_id)
        if t.state == "open":
            t.state = "finalizing"
            t._wake.set()
        elif t.state not in ("finalizing", "finished"):
            raise TransferTicketError(reason=f"transfer {transfer_id} is {t.state}")
        if t._task is not None:
            await asyncio.shield(t._task)
        if t.error is not None:
            raise t.error
        return t.info()

    async def cancel(self, transfer_id: str) -> dict[str, Any]:
        t = self.get(transfer_id)
        if t.state in ("expired", "failed"):
            # The ticket is closed (getTransfer says inactive) but its close
            # may still be under way: requests draining, qemu-nbd stopping,
            # the volume's lease let go. The upload is removed after it, or
            # its lease is found held by this agent (651).
            await t.closed.wait()
        if t.state == "open":
            # the transfer's task closes it and removes an upload's volume
            t.state = "cancelling"
            t._wake.set()
            if t._task is not None:
                await asyncio.shield(t._task)
        elif t.state in ("expired", "failed"):
            t.state = "cancelling"
            try:
                if t.writable:
                    await self._remove_upload(t)
            finally:
                t.state = "cancelled"
                self._publish(t)
        elif t.state == "cancelling" and t._task is not None:
            await asyncio.shield(t._task)
        elif t.state != "cancelled":
            raise TransferTicketError(reason=f"transfer {transfer_id} is {t.state}")
        return t.info()

    async def stop(self) -> None:
        """Agent shutdown: every open transfer is closed, an upload's volume
        removed as cancelTransfer would (its ticket ends with the agent:
        nobody can finish it; after a crash, recover does the same)."""
        for t in list(self.transfers.values()):
            if t.state == "open":
                t.state = "cancelling" if t.writable else "expired"
                t.error = TransferTicketError(reason="the agent stopped")
                t._wake.set()
        await asyncio.gather(*(t._task for t in self.transfers.values() if t._task),
                             return_exceptions=True)

    async def recover(self, params: dict[str, Any]) -> None:
        """After a crash, what a transfer that never closed left: its chain's
        LVs (block) that the dead agent had active and nothing prepared
        uses are deactivated, as its close would have; an upload is removed,
        as cancelTransfer would (its ticket died with the agent, so nobody
        can finish it); a volume it had made LEGAL is kept."""
        sd, img, vol = str(params["sdUUID"]), str(params["imgUUID"]), str(params["volUUID"])
        try:
            domain = await self.domains.active_domain(sd)
            chain = await domain.chain(img, vol)
            # one use and its release: LVs that only the transfer used go
            async with self.volumes.prepared.using(domain, chain):
                pass
        except HostAgentError as e:
            log.warning("Interrupted transfer of %s/%s/%s: %s", sd, img, vol, e.message)
            return
        if params.get("direction") != "upload" or chain[-1].legality != ILLEGAL:
            return
        log.warning("Removing volume %s/%s/%s of an interrupted upload", sd, img, vol)
        try:
            await self.volumes.delete_volume(sd, img, vol)
        except HostAgentError as e:
            log.error("Cannot remove %s/%s/%s: %s", sd, img, vol, e.message)

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self.transfers.items()
                    if t.closed_at is not None and now - t.closed_at > KEEP_CLOSED]:
            del self.transfers[key]

    def _publish(self, t: Transfer) -> None:
        """transfer.state (opened or closed) or transfer.progress."""
        t.notified = time.monotonic()
        if self.publish is not None:
            method = "transfer.progress" if t.state == "open" and t.closed_at is None \
                and t.opened else "transfer.state"
            t.opened = True
            self.publish(method, t.info())

    # ---- the data path's side (called on the event loop) ---------------------------------

    def acquire(self, ticket: str, write: bool) -> Transfer:
        """The transfer a request on the data listener may use; counted as
        under way until release()."""
        t = self.tickets.get(ticket)
        if t is None:
            raise TransferTicketError(reason="unknown ticket")
        if t.state != "open":
            raise TransferTicketError(reason=f"the transfer is {t.state}")
        if time.monotonic() > t.deadline:
            raise TransferTicketError(reason="the ticket expired")
        if write and not t.writable:
            raise TransferTicketError(reason="a download ticket does not allow writes")
        t.active += 1
        t.last_activity = time.monotonic()
        return t

    def release(self, t: Transfer, transferred: int = 0) -> None:
        t.active -= 1
        t.transferred += transferred
        t.last_activity = time.monotonic()
        t._wake.set()
        if transferred and self.count_bytes is not None:
            self.count_bytes(t.direction, transferred)
        if transferred and t.on_progress is not None and t.size:
            # bytes moved over the volume's size: a sparse upload sends less,
            # a client reading twice more; 100 only once finalized
            t.on_progress(min(99.0, t.transferred * 100 / t.size))
        if transferred and t.last_activity - t.notified >= PROGRESS_INTERVAL:
            self._publish(t)

    async def extents(self, t: Transfer, context: str) -> list[dict[str, Any]]:
        """imageio's extents: zero ({start, length, zero, hole}) or dirty
        ({start, length, dirty, zero}). A dirty extent's zero is the guest's
        view there, as imageio's nbd backend reports it (the dirty bitmap
        over base:allocation): its client zeroes a dirty zero area instead of
        reading it."""
        if context == "dirty":
            if t.dirty is None:
                raise InvalidParameter(field="context",
                                       reason="the transfer was started without dirty")
            dirty = await self._map(t, dirty=True)
            return _merge(_overlay(dirty, await self.extents(t, "zero")), "dirty")
        if t._extents is not None:
            return t._extents
        out = await self._map(t, dirty=False)
        if not t.writable:
            t._extents = out     # a download's image does not change
        return out

    async def _map(self, t: Transfer, *, dirty: bool) -> list[dict[str, Any]]:
        opts = f"driver=nbd,server.type=unix,server.path={t.sock}"
        if dirty:
            opts += f",x-dirty-bitmap=qemu:dirty-bitmap:{t.dirty}"
        try:
            r = await self.runner(["qemu-img", "map", "--output", "json", "--image-opts",
                                   opts], timeout=600)
            raw = json.loads(r.out)
            out = []
            for e in raw:
                start, length = int(e["start"]), int(e["length"])
                if dirty:
                    # x-dirty-bitmap: a dirty area reads as a hole (storage/nbd.py)
                    out.append({"start": start, "length": length, "dirty": not e["data"],
                                "zero": False})
                else:
                    out.append({"start": start, "length": length, "zero": bool(e["zero"]),
                                "hole": not e["data"]})
        except commands.CommandError as e:
            raise NbdError(op="map", reason=e.err_text.strip() or f"rc={e.rc}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise NbdError(op="map", reason=f"unexpected output: {e}") from None
        return _merge(out, "dirty" if dirty else "zero")

    # ---- a transfer's life ---------------------------------------------------------------

    async def _life(self, t: Transfer, ready: asyncio.Future[None]) -> None:
        """Hold the lease, keep the chain active, run qemu-nbd until the
        ticket closes; then finalize or cancel."""
        domain, md = t.domain, t.md
        try:
            await domain.leases.hold(md)
        except BaseException as e:
            ready.set_exception(e)
            return
        try:
            chain = await domain.chain(t.img, t.vol)
            async with self.prepared.using(domain, chain):
                if t.writable:
                    md = replace(await domain.volume(t.img, t.vol), legality=ILLEGAL)
                    await domain.write_volume_md(md)
                    if t.format == "qcow2":
                        # room for the largest qcow2 of that virtual size
                        room = await qemuimg.measure(size=md.capacity, dst_fmt="qcow2",
                                                     runner=self.runner)
                        await domain.open_volume_file(md, room["fully-allocated"])
                await self._serve(t, ready)
                if t.state == "finalizing" and t.writable:
                    await self._commit(t, md)
        except HostAgentError as e:
            t.error = e
            if not ready.done():
                ready.set_exception(e)
            log.warning("Transfer %s failed: %s", t.id, e.message)
        except Exception as e:
            t.error = HostAgentError()
            if not ready.done():
                ready.set_exception(e)
            log.exception("Transfer %s failed", t.id)
        except asyncio.CancelledError:
            # the lease was lost (it cancels the task that took it)
            t.error = TransferTicketError(reason="the volume's lease was lost")
            if not ready.done():
                ready.set_exception(t.error)
        finally:
            with contextlib.suppress(HostAgentError):
                await domain.leases.drop(md)
            t.state = {"finalizing": "finished", "cancelling": "cancelled"}.get(
                t.state, t.state)
            if t.error is not None and t.state in ("finished", "open", "starting"):
                t.state = "failed"
            t.closed_at = time.monotonic()
            self.tickets.pop(t.ticket, None)
        if t.opened:
            self._publish(t)
        if t.state == "cancelled" and t.writable:
            await self._remove_upload(t)
        log.info("Transfer %s: %s, %d bytes", t.id, t.state, t.transferred)

    def _nbd_argv(self, t: Transfer, sock: str) -> list[str]:
        path = t.domain.volume_path(t.img, t.vol)
        fmt = "raw" if t.format == "qcow2" or t.md.format != "COW" else "qcow2"
        t.path, t.direct = path, fmt == "raw" and t.dirty is None
        # Not --persistent: qemu-nbd exits when its last client leaves, and
        # _serve holds one connection for the transfer's life, so it ends
        # with the agent (it runs in a session of its own: a kill -9 of the
        # agent would leave it serving the volume).
        argv = ["qemu-nbd", "--socket", sock, "--format", fmt, "--export-name", "",
                "--shared", str(NBD_CLIENTS), "--cache", "writeback"]
        if t.writable:
            argv += ["--discard", "unmap"]
        else:
            argv.append("--read-only")
        if t.dirty is not None:
            argv += ["--bitmap", t.dirty]
        return [*argv, path]

    async def _serve(self, t: Transfer, ready: asyncio.Future[None]) -> None:
        tmp = tempfile.mkdtemp(prefix="hostagent-xfer-")
        sock_path = Path(tmp) / "nbd.sock"     # private, in local /tmp: never blocks
        sock = str(sock_path)
        child = asyncio.create_task(self.runner(self._nbd_argv(t, sock), timeout=1e9))
        stack = contextlib.ExitStack()
        try:
            deadline = time.monotonic() + NBD_START
            # qemu-nbd binds the socket file before it listens: no event to
            # wait on, so the connection is tried until it is taken
            while True:
                if child.done():
                    exc = child.exception()
                    reason = (exc.err_text.strip() if isinstance(exc, commands.CommandError)
                              else str(exc)) or "exited"
                    raise NbdError(op="export", reason=reason)
                if sock_path.exists():
                    try:
                        holder = await asyncio.to_thread(NbdClient, sock)
                        break
                    except NbdError:
                        pass
                if time.monotonic() > deadline:
                    raise NbdError(op="export", reason=f"not serving after {NBD_START:g} s")
                await asyncio.sleep(0.01)
            t.sock = sock
            stack.callback(holder.close)
            t.size = await self._export_size(t)
            t.state = "open"
            ready.set_result(None)
            await self._watch(t, child)
            await self._drain(t)
        finally:
            stack.close()
            child.cancel()
            await asyncio.gather(child, return_exceptions=True)
            shutil.rmtree(tmp, ignore_errors=True)

    async def _export_size(self, t: Transfer) -> int:
        opts = f"driver=nbd,server.type=unix,server.path={t.sock}"
        r = await self.runner(["qemu-img", "info", "--output", "json", "--image-opts", opts],
                              timeout=60)
        return int(json.loads(r.out)["virtual-size"])

    async def _watch(self, t: Transfer, child: asyncio.Task[Any]) -> None:
        """Until the ticket closes: finalize or cancel, expiry, inactivity,
        or qemu-nbd's death."""
        while t.state == "open":
            now = time.monotonic()
            idle = t.last_activity + t.inactivity - now if t.active == 0 else t.inactivity
            left = min(t.deadline - now, idle)
            if left <= 0:
                t.state = "expired"
                t.error = TransferTicketError(reason="the ticket expired" if t.deadline <= now
                                              else f"no request for {t.inactivity:g} s")
                return
            t._wake.clear()
            waiter = asyncio.create_task(t._wake.wait())
            done, _ = await asyncio.wait({waiter, child}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if child in done:
                raise NbdError(op="export", reason="qemu-nbd exited")

    async def _drain(self, t: Transfer) -> None:
        """Let requests under way end (new ones are refused) before qemu-nbd
        stops."""
        deadline = time.monotonic() + DRAIN
        while t.active and time.monotonic() < deadline:
            t._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t._wake.wait(), deadline - time.monotonic())

    async def _commit(self, t: Transfer, md: VolumeMetadata) -> None:
        """VDSM's verify_untrusted, then LEGAL: the file is what the metadata
        says (format, backing file, size) and not corrupt."""
        domain = t.domain
        path = domain.volume_path(t.img, t.vol)
        fmt = VolumeFormat.of(md.format).qemu
        try:
            [info] = await qemuimg.info(path, fmt=fmt)
        except qemuimg.QemuImgError as e:
            raise ImageVerificationError(volUUID=t.vol, reason=e.message) from None
        if info.format != fmt:
            raise ImageVerificationError(volUUID=t.vol, reason=f"format {info.format}, "
                                                               f"not {fmt}")
        if info.virtual_size > md.capacity:
            raise ImageVerificationError(volUUID=t.vol,
                                         reason=f"virtual size {info.virtual_size} over the "
                                                f"volume's capacity {md.capacity}")
        backing = info.backing_filename
        expected = md.parent if md.has_parent else None
        # the names the domains write: the parent's id, or ../<image>/<id> (a
        # template's volume in its own image); nothing else reaches out of the
        # image's directory (../../<id> is out of the domain's images)
        if not (backing == expected or (
                expected is not None and backing is not None
                and TEMPLATE_BACKING.fullmatch(backing) is not None
                and backing.endswith(f"/{expected}"))):
            raise ImageVerificationError(volUUID=t.vol,
                                         reason=f"backing file {backing!r}, the metadata "
                                                f"says {expected!r}")
        if info.raw.get("format-specific", {}).get("data", {}).get("data-file"):
            raise ImageVerificationError(volUUID=t.vol, reason="an external data file")
        if fmt == "qcow2":
            try:
                checked = await qemuimg.check(path)
            except qemuimg.QemuImgError as e:
                raise ImageVerificationError(volUUID=t.vol, reason=e.message) from None
            end = checked.get("image-end-offset")
            if t.format == "qcow2" and isinstance(end, int):
                await domain.close_volume_file(md, end)
        done = replace(md, legality=LEGAL, generation=md.generation + 1)
        domain.leases.check(md)
        await domain.write_volume_md(done)
        log.info("Transfer %s: volume %s/%s/%s verified, LEGAL", t.id, t.sd, t.img, t.vol)

    async def _remove_upload(self, t: Transfer) -> None:
        try:
            await self.volumes.delete_volume(t.sd, t.img, t.vol)
        except HostAgentError as e:
            log.warning("Transfer %s: cannot remove volume %s: %s", t.id, t.vol,
                        e.message)
            t.error = e
            raise


def _overlay(dirty: list[dict[str, Any]], zero: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dirty extents cut where the zero extents change, each with the zero
    flag of the area it covers (both lists cover the image from 0, sorted)."""
    out: list[dict[str, Any]] = []
    zi = 0
    for d in dirty:
        pos, end = d["start"], d["start"] + d["length"]
        while pos < end:
            while zi < len(zero) and zero[zi]["start"] + zero[zi]["length"] <= pos:
                zi += 1
            if zi == len(zero):     # past the zero map (not expected): data
                stop, is_zero = end, False
            elif zero[zi]["start"] > pos:    # a gap in the zero map: data
                stop, is_zero = min(end, zero[zi]["start"]), False
            else:
                z = zero[zi]
                stop, is_zero = min(end, z["start"] + z["length"]), bool(z["zero"])
            out.append({"start": pos, "length": stop - pos, "dirty": d["dirty"],
                        "zero": is_zero})
            pos = stop
    return out


def _merge(extents: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Adjacent extents of the same kind joined (qemu-img map splits them by
    offset in the file)."""
    out: list[dict[str, Any]] = []
    for e in extents:
        if out and all(out[-1][k] == e[k] for k in e if k not in ("start", "length")) \
                and out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append(dict(e))
    return out
