"""iSCSI connections: a node record (with CHAP), a session, its LUNs' disks and
their multipath maps.

A connection is one target on one portal (and iface); a LUN reached through
two portals is two connections whose disks multipathd joins into one map.
connect records in conn.owned what it does before it does it (node created,
session logged in), so disconnect and crash recovery undo exactly that: a
session or node the admin made is used but never logged out or deleted.
disconnect removes what sits on the session first (maps whose every path is
on it, then its SCSI disks), so no stale map or device is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from storage import commands, iscsiadm, multipath, udev
from storage.connections.base import Connection
from storage.errors import (
    HostAgentError,
    InvalidIpAddress,
    ISCSISetupError,
    ResourceTimeout,
    StorageServerConnectionError,
    StorageServerDisconnectionError,
)
from storage.iscsiadm import Portal

log = logging.getLogger("storage.connections.iscsi")

DEFAULT_PORT = 3260
# How often connects waiting for disks and maps look at sysfs and multipathd
POLL_INTERVAL = 0.15

T = TypeVar("T")


def iface_for(params: dict[str, Any]) -> str:
    """The iface a connection uses: ifaceName, else for an initiatorName an
    iface of the agent's own named after it, else 'default'."""
    if params.get("ifaceName"):
        return str(params["ifaceName"])
    if params.get("initiatorName"):
        digest = hashlib.sha256(str(params["initiatorName"]).encode()).hexdigest()[:12]
        return f"hostagent-{digest}"
    return iscsiadm.DEFAULT_IFACE


def target_of(params: dict[str, Any]) -> tuple[str, Portal, str]:
    """(iqn, portal, iface) of a connection's params, checked for the command line."""
    iqn = commands.check_arg(str(params["iqn"]), "iqn")
    p = iscsiadm.portal(str(params["connection"]), int(params.get("port") or DEFAULT_PORT),
                        params.get("tpgt"))
    return iqn, p, commands.check_arg(iface_for(params), "ifaceName")


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_address(text: str) -> bool:
    """An IP address, or a host name as RFC 1123 spells one (labels of
    letters, digits and inner hyphens; not all-numeric, so that 300.1.1.1
    is no name)."""
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    return (0 < len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


async def check_address(p: Portal, timeout: float) -> None:
    """A portal address that is no IP address and no host name, or a name
    the resolver says does not exist, is VDSM's InvalidIpAddress (472), not
    a connection failure. A resolver that cannot answer now (EAI_AGAIN, no
    DNS server) or not in time decides nothing (the connection attempt will)."""
    if not is_address(p.address):
        raise InvalidIpAddress(portal=p.address, reason="neither an IP address nor a host name")
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().getaddrinfo(p.address, p.port,
                                                         type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
                       socket.EAI_FAMILY, socket.EAI_SERVICE):
            raise InvalidIpAddress(portal=p.address, reason=e.strerror or str(e)) from None
    except TimeoutError:
        pass


async def probe_tcp(p: Portal, timeout: float) -> str | None:
    """Open and close a TCP connection to the portal; None if it worked,
    else why not."""
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(p.address, p.port)
    except TimeoutError:
        return f"no answer from {p.hostport} within {timeout:g} s"
    except OSError as e:
        return f"cannot connect to {p.hostport}: {e.strerror or e}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def discover_send_targets(address: str, port: int = DEFAULT_PORT, *, timeout: float,
                                user: str | None = None, password: str | None = None,
                                runner: commands.Runner = commands.run
                                ) -> list[dict[str, Any]]:
    """SendTargets discovery on a portal (with CHAP if user and password are
    given), leaving no record on the host: [{iqn, portal, tpgt, connection,
    port}]."""
    p = iscsiadm.portal(address, port)
    await check_address(p, timeout)
    why = await probe_tcp(p, timeout)
    if why is not None:
        raise StorageServerConnectionError(reason=why)
    found = await iscsiadm.discover_sendtargets(p, timeout=timeout, user=user,
                                                password=password, runner=runner)
    return [{"iqn": t.iqn, "portal": t.portal.hostport, "tpgt": t.portal.tpgt,
             "connection": t.portal.address, "port": t.portal.port} for t in found]


class SharedPoll(Generic[T]):
    """One call of `fetch` shared by every concurrent caller, and at most one
    started per `interval`: twenty connections waiting for their disks and
    maps poll sysfs and multipathd once per interval, not twenty times. A
    caller always gets the answer of a fetch that started after it asked:
    a session that logged in a moment ago is never missed for a stale view."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], interval: float) -> None:
        self.fetch = fetch
        self.interval = interval
        self._task: asyncio.Future[tuple[float, T]] | None = None
        self._last = float("-inf")

    async def _run(self) -> tuple[float, T]:
        wait = self._last + self.interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        started = self._last = time.monotonic()
        return started, await self.fetch()

    async def __call__(self) -> T:
        asked = time.monotonic()
        while True:
            task = self._task
            if task is None or task.done():
                task = self._task = asyncio.ensure_future(self._run())
            started, value = await asyncio.shield(task)
            if started >= asked:
                return value


class IscsiBackend:
    def __init__(self, *, login_timeout: float = 120.0, command_timeout: float = 30.0,
                 device_timeout: float = 30.0, scan_grace: float = 5.0,
                 connections: Callable[[], Iterable[Connection]] = lambda: (),
                 runner: commands.Runner = commands.run,
                 sysfs: Path = udev.SYSFS) -> None:
        self.login_timeout = login_timeout
        self.command_timeout = command_timeout
        self.device_timeout = device_timeout
        self.scan_grace = scan_grace
        self.connections = connections
        self.runner = runner
        self.sysfs = sysfs
        # Deciding which maps a disconnect flushes and removing the disks
        # under them is done one connection at a time: two connections of one
        # map (two portals) torn down together must not each leave the map to
        # the other.
        self._teardown = asyncio.Lock()
        self._paths = SharedPoll(functools.partial(multipath.paths, timeout=command_timeout,
                                                   runner=runner), POLL_INTERVAL)
        self._sessions = SharedPoll(functools.partial(iscsiadm.sessions,
                                                      timeout=command_timeout, sysfs=sysfs),
                                    POLL_INTERVAL)
        # Changes to iscsiadm's record database, one at a time: its own lock
        # file makes concurrent changes fail (ISCSI_ERR_IDBM) under load.
        self._records = asyncio.Lock()

    # ---- Backend protocol ----------------------------------------------------------

    def target_key(self, params: dict[str, Any]) -> str:
        iqn, p, iface = target_of(params)
        return f"iscsi:{iface}:{p.hostport}:{iqn}"

    def local_path(self, conn: Connection) -> Path | None:
        return None

    async def connect(self, conn: Connection, save: Callable[[], None]) -> None:
        iqn, p, iface = target_of(conn.params)
        before = conn.owned or {}
        # What an earlier run of this connection did stays owned (recovery).
        owned: dict[str, Any] = {"portal": p.arg(), "iface": iface,
                                 "iface_created": bool(before.get("iface_created")),
                                 "node_created": bool(before.get("node_created")),
                                 "logged_in": bool(before.get("logged_in"))}
        conn.owned = owned
        session = await self._session(iqn, p, iface)
        new_login = False
        if session is not None and session.logged_in:
            log.info("iSCSI %s at %s: using the existing session %d%s", iqn, p, session.sid,
                     "" if owned["logged_in"] else " (not made by this agent)")
        else:
            await check_address(p, self.command_timeout)
            async with self._records:
                await self._prepare_node(conn, iqn, p, iface, save)
            new_login = await self._login(conn, iqn, p, iface, save)
            session = await self._session(iqn, p, iface)
            if session is None or not session.logged_in:
                # rc 15 for a session in recovery, or one that dropped at once
                raise StorageServerConnectionError(
                    reason=f"the iSCSI session to {iqn} at {p.hostport} is "
                           f"{session.state if session else 'gone'} after login")
        owned["details"] = await self._settle(session, rescan=not new_login)
        log.info("iSCSI %s at %s connected: session %d, disks %s", iqn, p, session.sid,
                 ", ".join(owned["details"]["disks"]) or "none")

    async def disconnect(self, conn: Connection) -> None:
        iqn, p, iface = target_of(conn.params)
        owned = conn.owned or {}
        session = await self._session(iqn, p, iface)
        if session is not None and owned.get("logged_in") and not self._shared(conn):
            async with self._teardown:
                wwids = await self._remove_devices(session)
            # a failure is iSCSILogoutError (474)
            await iscsiadm.logout(iqn, p, iface, timeout=self.login_timeout,
                                  runner=self.runner)
            left = await udev.wait_gone(session.disks, timeout=self.device_timeout,
                                        sysfs=self.sysfs)
            if left:
                log.warning("iSCSI %s at %s: disks %s still present after logout", iqn, p,
                            ", ".join(left))
            await self._flush_pathless(wwids)
            owned["logged_in"] = False
        elif session is not None:
            log.info("iSCSI %s at %s: leaving session %d logged in (not made by this "
                     "connection)", iqn, p, session.sid)
        await self._forget_records(conn, iqn, p, iface, owned)

    async def check(self, conn: Connection) -> None:
        iqn, p, iface = target_of(conn.params)
        session = await self._session(iqn, p, iface)
        if session is None:
            raise StorageServerConnectionError(reason=f"no iSCSI session to {iqn} at "
                                                      f"{p.hostport}")
        if not session.logged_in:
            raise StorageServerConnectionError(
                reason=f"iSCSI session {session.sid} to {iqn} at {p.hostport} is "
                       f"{session.state or 'not logged in'}")

    async def test(self, params: dict[str, Any]) -> dict[str, Any]:
        """Reachability without touching the host: a TCP connection to the
        portal, then a nonpersistent SendTargets discovery that must offer
        the iqn. CHAP credentials are not tried (that takes a login)."""
        iqn, p, iface = target_of(params)
        details: dict[str, Any] = {"portal": p.hostport, "iqn": iqn}
        why = await probe_tcp(p, self.command_timeout)
        if why is not None:
            return {"reachable": False, "message": why, "details": details}
        try:
            found = await iscsiadm.discover_sendtargets(p, timeout=self.command_timeout,
                                                        runner=self.runner)
        except HostAgentError as e:
            return {"reachable": False, "message": e.message,
                    "details": {**details, "code": e.code, "name": e.name}}
        offered = sorted({t.iqn for t in found})
        details["targets"] = offered
        session = await self._session(iqn, p, iface)
        details["loggedIn"] = session is not None and session.logged_in
        if iqn not in offered:
            return {"reachable": False,
                    "message": f"portal {p.hostport} answers but does not offer {iqn}",
                    "details": details}
        return {"reachable": True, "message": f"portal {p.hostport} offers {iqn}",
                "details": details}

    # ---- connect steps -------------------------------------------------------------

    async def _session(self, iqn: str, p: Portal, iface: str) -> iscsiadm.Session | None:
        return await iscsiadm.find_session(iqn, p, iface, timeout=self.command_timeout,
                                           sysfs=self.sysfs)

    async def _prepare_node(self, conn: Connection, iqn: str, p: Portal, iface: str,
                            save: Callable[[], None]) -> None:
        owned = conn.owned
        initiator = conn.params.get("initiatorName")
        if iface != iscsiadm.DEFAULT_IFACE:
            current = await iscsiadm.iface_initiator_name(iface, timeout=self.command_timeout,
                                                          runner=self.runner)
            if current is None:
                if not initiator:
                    raise ISCSISetupError(reason=f"there is no iSCSI iface {iface}")
                owned["iface_created"] = True
                save()
                await iscsiadm.iface_create(iface, initiator, timeout=self.command_timeout,
                                            runner=self.runner)
            elif initiator and current != initiator:
                raise ISCSISetupError(reason=f"iface {iface} has initiator name "
                                             f"{current or '(default)'}, not {initiator}")
        if not await iscsiadm.node_exists(iqn, p, iface, timeout=self.command_timeout,
                                          runner=self.runner):
            owned["node_created"] = True
            save()
            await iscsiadm.node_new(iqn, p, iface, timeout=self.command_timeout,
                                    runner=self.runner)
        # Always set: a node record left by someone else may carry other
        # credentials. node.startup manual: iscsid must not log in at boot,
        # the agent re-establishes its connections itself.
        settings = {"node.startup": "manual",
                    **iscsiadm.chap_settings(conn.params.get("user"),
                                             conn.params.get("password"))}
        await iscsiadm.node_update(iqn, p, iface, settings, timeout=self.command_timeout,
                                   secrets=conn.secrets, runner=self.runner)

    async def _login(self, conn: Connection, iqn: str, p: Portal, iface: str,
                     save: Callable[[], None]) -> bool:
        owned = conn.owned
        was_ours = owned["logged_in"]
        owned["logged_in"] = True
        save()
        try:
            new = await iscsiadm.login(iqn, p, iface, timeout=self.login_timeout,
                                       secrets=conn.secrets, runner=self.runner)
        except BaseException as e:
            log.warning("iSCSI %s at %s: login failed (%s)", iqn, p,
                        e.message if isinstance(e, HostAgentError) else type(e).__name__)
            await self._undo_login(conn, iqn, p, iface, timed_out=isinstance(e, ResourceTimeout))
            save()
            raise
        if not new:
            # rc 15: a session appeared meanwhile, made by someone else
            owned["logged_in"] = was_ours
        return new

    async def _undo_login(self, conn: Connection, iqn: str, p: Portal, iface: str, *,
                          timed_out: bool) -> None:
        """After a failed login: no half-made session, no node or iface left
        that this connection created."""
        owned = conn.owned
        if timed_out:
            # iscsid may still be retrying the login iscsiadm asked for
            with contextlib.suppress(HostAgentError):
                await iscsiadm.logout(iqn, p, iface, timeout=self.login_timeout,
                                      runner=self.runner)
        owned["logged_in"] = False
        with contextlib.suppress(HostAgentError):
            await self._forget_records(conn, iqn, p, iface, owned)

    async def _settle(self, session: iscsiadm.Session, *, rescan: bool) -> dict[str, Any]:
        """Scan the session's LUNs, wait for udev to make their disks and for
        multipathd to map them; returns what was found for the details."""
        if rescan:
            try:
                await iscsiadm.rescan_session(session.sid, timeout=self.login_timeout,
                                              runner=self.runner)
            except commands.CommandError as e:
                # the session is up; LUNs already there are still usable
                log.warning("Rescan of session %d failed: %s", session.sid,
                            e.fields.get("stderr"))
        else:
            await self._wait_scanned(session)
        details: dict[str, Any] = {"session": session.sid, "disks": [], "luns": []}
        try:
            fresh = await iscsiadm.wait_disks_made(session.sid, timeout=self.device_timeout,
                                                   fetch=self._sessions) or session
            details["disks"] = list(fresh.disks)
            if not fresh.disks:
                return details
            disks = await udev.wait_disks(fresh.disks, timeout=self.device_timeout)
        except ResourceTimeout as e:
            log.warning("Session %d: %s", session.sid, e.message)
            details["warning"] = e.message
            return details
        by_wwid: dict[str, list[str]] = {}
        for d in disks.values():
            by_wwid.setdefault(d.wwid, []).append(d.name)
        maps: dict[str, str | None] = {}
        try:
            names = await asyncio.gather(
                *(self._wait_map(w, devs) for w, devs in sorted(by_wwid.items())))
            maps = dict(zip(sorted(by_wwid), names, strict=True))
        except commands.CommandError as e:
            log.warning("multipathd does not answer (%s): LUNs of session %d are not "
                        "multipathed", e.fields.get("stderr"), session.sid)
        details["luns"] = [{"disk": d.name, "lun": d.lun, "guid": d.wwid,
                            "map": maps.get(d.wwid)}
                           for d in sorted(disks.values(), key=lambda d: d.name)]
        return details

    async def _wait_scanned(self, session: iscsiadm.Session) -> None:
        """iscsid scans a new session's target in the background (iscsiadm
        --login returns before): wait until the kernel reports the target
        scanned. Where it does not tell (older kernels), or iscsid has not
        scanned within the grace time (node.session.scan = manual), scan the
        session's SCSI host here; that write returns when the scan is done."""
        deadline = time.monotonic() + self.scan_grace
        current: iscsiadm.Session | None = session
        while (current is not None and current.target_state == "ALLOCATED"
               and time.monotonic() < deadline):
            current = next((s for s in await self._sessions() if s.sid == session.sid), None)
        if current is not None and current.target_state != "SCANNED" and current.host:
            await udev.scan_host(current.host, timeout=self.login_timeout, sysfs=self.sysfs)

    async def _wait_map(self, wwid: str, devs: list[str]) -> str | None:
        try:
            return await multipath.wait_for_paths(wwid, devs, timeout=self.device_timeout,
                                                  fetch=self._paths)
        except ResourceTimeout as e:
            # blacklisted or not multipathed by configuration: the LUN is
            # still usable through its disk
            log.warning("%s", e.message)
            return None

    # ---- disconnect steps ----------------------------------------------------------

    def _others(self, conn: Connection) -> list[Connection]:
        return [c for c in self.connections() if c.id != conn.id and c.type == conn.type]

    def _shared(self, conn: Connection) -> bool:
        """Another connection of this agent uses the same session."""
        key = self.target_key(conn.params)
        return any(self.target_key(c.params) == key and c.owned.get("logged_in")
                   for c in self._others(conn))

    async def _forget_records(self, conn: Connection, iqn: str, p: Portal, iface: str,
                              owned: dict[str, Any]) -> None:
        """Delete the node record and the iface this connection created, if
        no other connection uses them."""
        async with self._records:
            if owned.get("node_created"):
                await iscsiadm.node_delete(iqn, p, iface, timeout=self.command_timeout,
                                           runner=self.runner)
                owned["node_created"] = False
            if owned.get("iface_created") and not self._iface_used(conn, iface):
                await iscsiadm.iface_delete(iface, timeout=self.command_timeout,
                                            runner=self.runner)
                owned["iface_created"] = False

    def _iface_used(self, conn: Connection, iface: str) -> bool:
        return any(iface_for(c.params) == iface for c in self._others(conn))

    async def _remove_devices(self, session: iscsiadm.Session) -> set[str]:
        """Flush the maps whose every path is on `session`, then delete the
        session's disks; returns the WWIDs of its disks. A map that is in
        use is refused (452) before anything is changed."""
        mine = set(session.disks)
        if not mine:
            return set()
        wwids: set[str] = set()
        try:
            all_paths = await multipath.paths(timeout=self.command_timeout, runner=self.runner)
        except commands.CommandError as e:
            log.warning("multipathd does not answer (%s): no map to flush",
                        e.fields.get("stderr"))
            all_paths = None
        if all_paths is not None:
            by_map: dict[str, list[multipath.MPath]] = {}
            for mp in all_paths:
                if mp.dev in mine and mp.wwid:
                    wwids.add(mp.wwid)
                if mp.map:
                    by_map.setdefault(mp.map, []).append(mp)
            doomed = sorted(name for name, ps in by_map.items()
                            if any(mp.dev in mine for mp in ps)
                            and all(mp.dev in mine for mp in ps))
            maps = {m.name: m for m in await multipath.maps(timeout=self.command_timeout,
                                                            runner=self.runner)} if doomed else {}
            for name in doomed:
                m = maps.get(name)
                held = await asyncio.to_thread(udev.holders, m.sysfs, self.sysfs) if m else []
                if held:
                    raise StorageServerDisconnectionError(
                        reason=f"multipath map {name} is in use by {', '.join(held)}")
            for name in doomed:
                await multipath.flush(name, timeout=self.command_timeout, runner=self.runner)
                log.info("Flushed multipath map %s", name)
        for disk in sorted(mine):
            await udev.delete_disk(disk, timeout=self.device_timeout, sysfs=self.sysfs)
        return wwids

    async def _flush_pathless(self, wwids: set[str]) -> None:
        """Maps of these WWIDs left with no path at all (multipathd usually
        removes them itself): flush them, so no stale map stays."""
        if not wwids:
            return
        try:
            maps = await multipath.maps(timeout=self.command_timeout, runner=self.runner)
        except commands.CommandError:
            return
        for m in maps:
            if m.wwid in wwids and m.path_count == 0:
                try:
                    await multipath.flush(m.name, timeout=self.command_timeout,
                                          runner=self.runner)
                except HostAgentError as e:
                    log.warning("Map %s has no path left and cannot be flushed: %s", m.name,
                                e.message)
