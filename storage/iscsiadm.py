"""iscsiadm(8) wrapper: discovery, node records, login/logout, rescan; and the
kernel's iSCSI sessions, read from sysfs (/sys/class/iscsi_session).

iscsiadm takes CHAP secrets only on its command line (`-o update -n
node.session.auth.password -v SECRET`); every call that may carry one passes
it as `redact=`, so it never reaches a log line, an error or a result.
Sessions come from sysfs, not from `iscsiadm -m session` text: sysfs is what
the kernel has, needs no iscsid and has no format to parse.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from storage import commands
from storage.errors import (
    InvalidIpAddress,
    ISCSIDiscoveryError,
    ISCSILoginAuthError,
    ISCSILogoutError,
    ISCSISetupError,
    ResourceTimeout,
    StorageServerConnectionError,
)

log = logging.getLogger("storage.iscsiadm")

ISCSIADM = "iscsiadm"
SYSFS = Path("/sys")
DEFAULT_IFACE = "default"

# Exit codes, from open-iscsi's include/iscsi_err.h (man iscsiadm, EXIT STATUS).
ERR_GENERIC = 1
ERR_SESS_NOT_FOUND = 2
ERR_LOGIN = 5
ERR_IDBM = 6
ERR_INVAL = 7
ERR_TRANS_TIMEOUT = 8
ERR_LOGOUT = 10
ERR_PDU_TIMEOUT = 11
ERR_SESS_EXISTS = 15
ERR_FATAL_LOGIN = 19
ERR_ISCSID_NOTCONN = 20
ERR_NO_OBJS_FOUND = 21
ERR_SYSFS_LOOKUP = 22
ERR_LOGIN_AUTH_FAILED = 24
ERR_BUSY = 28
ERR_AGAIN = 29

RC_NAMES: Mapping[int, str] = {
    ERR_GENERIC: "ISCSI_ERR",
    ERR_SESS_NOT_FOUND: "ISCSI_ERR_SESS_NOT_FOUND",
    3: "ISCSI_ERR_NOMEM",
    4: "ISCSI_ERR_TRANS",
    ERR_LOGIN: "ISCSI_ERR_LOGIN",
    ERR_IDBM: "ISCSI_ERR_IDBM",
    ERR_INVAL: "ISCSI_ERR_INVAL",
    ERR_TRANS_TIMEOUT: "ISCSI_ERR_TRANS_TIMEOUT",
    9: "ISCSI_ERR_INTERNAL",
    ERR_LOGOUT: "ISCSI_ERR_LOGOUT",
    ERR_PDU_TIMEOUT: "ISCSI_ERR_PDU_TIMEOUT",
    12: "ISCSI_ERR_TRANS_NOT_FOUND",
    13: "ISCSI_ERR_ACCESS",
    14: "ISCSI_ERR_TRANS_CAPS",
    ERR_SESS_EXISTS: "ISCSI_ERR_SESS_EXISTS",
    16: "ISCSI_ERR_INVALID_MGMT_REQ",
    17: "ISCSI_ERR_ISNS_UNAVAILABLE",
    18: "ISCSI_ERR_ISCSID_COMM_ERR",
    ERR_FATAL_LOGIN: "ISCSI_ERR_FATAL_LOGIN",
    ERR_ISCSID_NOTCONN: "ISCSI_ERR_ISCSID_NOTCONN",
    ERR_NO_OBJS_FOUND: "ISCSI_ERR_NO_OBJS_FOUND",
    ERR_SYSFS_LOOKUP: "ISCSI_ERR_SYSFS_LOOKUP",
    23: "ISCSI_ERR_HOST_NOT_FOUND",
    ERR_LOGIN_AUTH_FAILED: "ISCSI_ERR_LOGIN_AUTH_FAILED",
    25: "ISCSI_ERR_ISNS_QUERY",
    26: "ISCSI_ERR_ISNS_REG_FAILED",
    27: "ISCSI_ERR_OP_NOT_SUPP",
    ERR_BUSY: "ISCSI_ERR_BUSY",
    ERR_AGAIN: "ISCSI_ERR_AGAIN",
    30: "ISCSI_ERR_UNKNOWN_DISCOVERY_TYPE",
    31: "ISCSI_ERR_CHILD_TERMINATED",
    32: "ISCSI_ERR_SESSION_NOT_CONNECTED",
}

LOGGED_IN = "LOGGED_IN"


# ---- portals ------------------------------------------------------------------------

def strip_brackets(address: str) -> str:
    """'[fe80::1]' -> 'fe80::1' (IPv6 portals are written in brackets)."""
    if address.startswith("[") and address.endswith("]"):
        return address[1:-1]
    return address


@dataclass(frozen=True, order=True)
class Portal:
    """A target portal: address (no brackets), TCP port, optional target
    portal group tag."""

    address: str
    port: int = 3260
    tpgt: int | None = None

    @property
    def hostport(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def arg(self) -> str:
        """The value of iscsiadm's -p: ADDRESS:PORT[,TPGT]."""
        return self.hostport if self.tpgt is None else f"{self.hostport},{self.tpgt}"

    def __str__(self) -> str:
        return self.arg()


def portal(address: str, port: int = 3260, tpgt: int | None = None) -> Portal:
    """A Portal from request values, checked for the command line."""
    address = strip_brackets(commands.check_arg(address, "connection"))
    if not address or any(c.isspace() or c in ",/" for c in address):
        raise InvalidIpAddress(portal=address, reason="not a portal address")
    return Portal(address.lower(), int(port), tpgt)


@dataclass(frozen=True)
class DiscoveredTarget:
    iqn: str
    portal: Portal


_DISCOVERY_LINE = re.compile(r"^(?P<host>\[[^\]]+\]|[^\s,\[\]]+):(?P<port>\d+),(?P<tpgt>-?\d+)"
                             r"\s+(?P<iqn>\S+)$")


def parse_discovery(text: str) -> list[DiscoveredTarget]:
    """Parse sendtargets output, one `ADDRESS:PORT,TPGT IQN` per line.

    Lines that do not match (warnings some versions print on stdout) are
    skipped; IPv6 addresses come in brackets.
    """
    found: list[DiscoveredTarget] = []
    seen: set[DiscoveredTarget] = set()
    for line in text.splitlines():
        m = _DISCOVERY_LINE.match(line.strip())
        if not m:
            continue
        tpgt = int(m.group("tpgt"))
        t = DiscoveredTarget(m.group("iqn"),
                             Portal(strip_brackets(m.group("host")).lower(), int(m.group("port")),
                                    None if tpgt < 0 else tpgt))
        if t not in seen:
            seen.add(t)
            found.append(t)
    return found


# ---- commands -----------------------------------------------------------------------

def _node_args(iqn: str, p: Portal, iface: str) -> list[str]:
    commands.check_arg(iqn, "iqn")
    commands.check_arg(iface, "ifaceName")
    return [ISCSIADM, "-m", "node", "-T", iqn, "-p", p.arg(), "-I", iface]


def _reason(e: commands.CommandError) -> str:
    return str(e.fields.get("stderr") or e.message)


async def discover_sendtargets(p: Portal, *, timeout: float, iface: str | None = None,
                               user: str | None = None, password: str | None = None,
                               runner: commands.Runner = commands.run
                               ) -> list[DiscoveredTarget]:
    """SendTargets discovery that leaves no record behind (`-o nonpersistent`:
    no discovery db entry and no node records are written). With `user` and
    `password`, CHAP for the discovery session: the credentials can only be
    given through the host's discovery db record of the portal (one per
    portal, whatever the iface). A record made for the call is deleted after
    it; a record the host already had (an admin's discovery) gets its CHAP
    settings back as they were. Passwords, ours and the record's, are
    redacted from whatever is logged or raised."""
    iface_args = ["-I", commands.check_arg(iface, "ifaceName")] if iface else []
    if not (user and password):
        argv = [ISCSIADM, "-m", "discovery", "-t", "sendtargets", "-p", p.hostport,
                *iface_args, "-o", "nonpersistent"]
        try:
            result = await runner(argv, timeout=timeout, rc_names=RC_NAMES)
        except commands.CommandError as e:
            raise ISCSIDiscoveryError(reason=f"discovery on {p.hostport} failed: "
                                             f"{_reason(e)}") from None
        return parse_discovery(result.text)
    settings = {AUTH_METHOD: "CHAP", AUTH_USER: commands.check_arg(user, "user"),
                AUTH_PASSWORD: commands.check_arg(password, "password")}
    record = [ISCSIADM, "-m", "discoverydb", "-t", "sendtargets", "-p", p.hostport,
              *iface_args]
    # one discovery with credentials per portal at a time: the record is the
    # host's, keyed by portal, and another call's would be replaced
    async with _DISCOVERY_LOCKS.setdefault(p.hostport, asyncio.Lock()):
        try:
            saved = await _discovery_auth(p, timeout=timeout, runner=runner)
        except commands.CommandError as e:
            raise ISCSIDiscoveryError(reason=f"discovery on {p.hostport} failed: cannot "
                                             f"read its discovery record: {_reason(e)}"
                                      ) from None
        secrets_ = [password, *(v for v in (saved or {}).values() if v)]
        try:
            if saved is None:
                await _db(runner, [*record, "-o", "new"], timeout=timeout)
            await _db(runner, _update(record, settings), timeout=timeout, redact=[password])
            # VDSM answers 475 for any failed discovery, CHAP refused too
            # (its iSCSIDiscoveryError): iscsiadm exits 24 then
            result = await runner([*record, "--discover", "-o", "nonpersistent"],
                                  timeout=timeout, rc_names=RC_NAMES, redact=[password])
        except commands.CommandError as e:
            raise ISCSIDiscoveryError(reason=f"discovery on {p.hostport} failed: "
                                             f"{_reason(e)}") from None
        finally:
            try:
                if saved is None:
                    await _db(runner, [*record, "-o", "delete"], timeout=timeout,
                              ok_rcs=(0, ERR_NO_OBJS_FOUND))
                else:
                    await _db(runner, _update(record, saved), timeout=timeout,
                              redact=secrets_)
            except commands.CommandError as e:
                log.error("Discovery record of %s left with this call's CHAP credentials: "
                          "%s", p.hostport, _reason(e))
    return parse_discovery(result.text)


AUTH_METHOD = "discovery.sendtargets.auth.authmethod"
AUTH_USER = "discovery.sendtargets.auth.username"
AUTH_PASSWORD = "discovery.sendtargets.auth.password"  # noqa: S105 (a key, not a secret)
_DISCOVERY_LOCKS: dict[str, asyncio.Lock] = {}


def _update(record: Sequence[str], settings: Mapping[str, str]) -> list[str]:
    argv = [*record, "-o", "update"]
    for key, value in settings.items():
        argv += ["-n", key, "-v", value]
    return argv


def parse_record(text: str) -> dict[str, str]:
    """An iscsiadm record as printed ('key = value' lines) -> {key: value},
    '<empty>' read as ''."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and not key.startswith("#"):
            value = value.strip()
            fields[key.strip()] = "" if value == "<empty>" else value
    return fields


async def _discovery_auth(p: Portal, *, timeout: float,
                          runner: commands.Runner) -> dict[str, str] | None:
    """The CHAP settings of the host's discovery record of portal `p` (the
    password in clear: `-S`), None if it has none. Listed first: showing a
    missing record fails like a busy database (rc 6)."""
    listed = await _db(runner, [ISCSIADM, "-m", "discoverydb"], timeout=timeout,
                       ok_rcs=(0, ERR_NO_OBJS_FOUND))
    if f"{p.hostport} via sendtargets" not in {ln.strip() for ln in listed.text.splitlines()}:
        return None
    shown = await runner([ISCSIADM, "-m", "discoverydb", "-t", "sendtargets", "-p", p.hostport,
                          "-o", "show", "-S"], timeout=timeout, rc_names=RC_NAMES)
    fields = parse_record(shown.text)
    return {k: fields.get(k, "") for k in (AUTH_METHOD, AUTH_USER, AUTH_PASSWORD)}


# iscsiadm locks its record database with a lock file it retries for a while,
# then gives up with ISCSI_ERR_IDBM: under many concurrent logins a record
# change can lose that race; it is safe to repeat.
DB_RETRIES = 3
DB_RETRY_DELAY = 0.2


async def _db(runner: commands.Runner, argv: Sequence[str], *, timeout: float,
              ok_rcs: Sequence[int] = (0,), redact: Sequence[str] = ()
              ) -> commands.CommandResult:
    """Run an iscsiadm command that changes or reads the record database."""
    for attempt in range(DB_RETRIES):
        try:
            return await runner(argv, timeout=timeout, ok_rcs=ok_rcs, rc_names=RC_NAMES,
                                redact=redact)
        except commands.CommandError as e:
            if e.rc != ERR_IDBM or attempt == DB_RETRIES - 1:
                raise
            log.debug("iscsiadm record database busy; trying again")
            await asyncio.sleep(DB_RETRY_DELAY * (attempt + 1))
    raise AssertionError("unreachable")


async def node_exists(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *, timeout: float,
                      runner: commands.Runner = commands.run) -> bool:
    result = await _db(runner, _node_args(iqn, p, iface), timeout=timeout,
                       ok_rcs=(0, ERR_NO_OBJS_FOUND))
    return result.rc == 0


async def node_new(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *, timeout: float,
                   runner: commands.Runner = commands.run) -> None:
    try:
        await _db(runner, [*_node_args(iqn, p, iface), "-o", "new"], timeout=timeout)
    except commands.CommandError as e:
        raise ISCSISetupError(reason=f"cannot create node {iqn} {p}: {_reason(e)}") from None


async def node_update(iqn: str, p: Portal, iface: str, settings: Mapping[str, str], *,
                      timeout: float, secrets: Sequence[str] = (),
                      runner: commands.Runner = commands.run) -> None:
    """Set node record keys in one call (several -n/-v pairs); `secrets` are
    redacted from what is logged and raised."""
    if not settings:
        return
    argv = [*_node_args(iqn, p, iface), "-o", "update"]
    for key, value in settings.items():
        argv += ["-n", key, "-v", value]
    try:
        await _db(runner, argv, timeout=timeout, redact=secrets)
    except commands.CommandError as e:
        raise ISCSISetupError(reason=f"cannot update node {iqn} {p}: {_reason(e)}") from None


def chap_settings(user: str | None, password: str | None) -> dict[str, str]:
    """Node settings for one-way CHAP, or for no authentication."""
    if user and password:
        return {"node.session.auth.authmethod": "CHAP",
                "node.session.auth.username": commands.check_arg(user, "user"),
                "node.session.auth.password": commands.check_arg(password, "password")}
    return {"node.session.auth.authmethod": "None"}


async def node_delete(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *, timeout: float,
                      runner: commands.Runner = commands.run) -> bool:
    """Delete the node record; False if there was none."""
    try:
        result = await _db(runner, [*_node_args(iqn, p, iface), "-o", "delete"],
                           timeout=timeout, ok_rcs=(0, ERR_NO_OBJS_FOUND))
    except commands.CommandError as e:
        raise ISCSISetupError(reason=f"cannot delete node {iqn} {p}: {_reason(e)}") from None
    return result.rc == 0


async def login(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *, timeout: float,
                secrets: Sequence[str] = (), runner: commands.Runner = commands.run) -> bool:
    """Log in to the node; False if a session already existed (rc 15).

    A refused CHAP login (rc 24) is iSCSILoginAuthError (476); any other
    failure is a connection error (451) with iscsiadm's reason.
    """
    try:
        result = await runner([*_node_args(iqn, p, iface), "--login"], timeout=timeout,
                              ok_rcs=(0, ERR_SESS_EXISTS), rc_names=RC_NAMES, redact=secrets)
    except commands.CommandError as e:
        if e.rc == ERR_LOGIN_AUTH_FAILED:
            raise ISCSILoginAuthError(
                reason=f"{iqn} at {p.hostport}: CHAP authentication failed "
                       "(wrong user or password)") from None
        raise StorageServerConnectionError(
            reason=f"iSCSI login to {iqn} at {p.hostport} failed: {_reason(e)}") from None
    return result.rc == 0


async def logout(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *, timeout: float,
                 runner: commands.Runner = commands.run) -> bool:
    """Log out of the node's session; False if there was none (rc 21)."""
    try:
        result = await runner([*_node_args(iqn, p, iface), "--logout"], timeout=timeout,
                              ok_rcs=(0, ERR_NO_OBJS_FOUND), rc_names=RC_NAMES)
    except commands.CommandError as e:
        raise ISCSILogoutError(
            reason=f"iSCSI logout from {iqn} at {p.hostport} failed: {_reason(e)}") from None
    if result.rc == ERR_NO_OBJS_FOUND and "Could not logout" in result.err_text:
        # iscsiadm also ends with rc 21 ("No matching sessions found") when it
        # found the session but its logout failed (seen in the lab with iscsid
        # gone: "initiator reported error (20 - could not connect to iscsid)").
        # The session is still there: that is no "nothing to log out of".
        why = " | ".join(line for line in result.err_text.splitlines()
                         if line.startswith("iscsiadm:") and "No matching" not in line)
        raise ISCSILogoutError(reason=f"iSCSI logout from {iqn} at {p.hostport} failed: {why}")
    return result.rc == 0


async def rescan_session(sid: int, *, timeout: float,
                         runner: commands.Runner = commands.run) -> None:
    """Rescan one session's LUNs (new LUNs appear, resized ones are updated);
    returns when the kernel's scan is done."""
    await runner([ISCSIADM, "-m", "session", "-r", str(int(sid)), "-R"], timeout=timeout,
                 rc_names=RC_NAMES)


async def rescan_sessions(*, timeout: float,
                          runner: commands.Runner = commands.run) -> bool:
    """Rescan every session's LUNs (`iscsiadm -m session -R`: new LUNs
    appear, each disk's capacity is read again); False when there is no
    session (rc 21)."""
    result = await runner([ISCSIADM, "-m", "session", "-R"], timeout=timeout,
                          rc_names=RC_NAMES, ok_rcs=(0, ERR_NO_OBJS_FOUND))
    return result.rc == 0


# ---- ifaces (for initiatorName) -------------------------------------------------------

def parse_ifaces(text: str) -> dict[str, str]:
    """`iscsiadm -m iface` lines ('NAME TRANSPORT,HWADDRESS,IPADDRESS,NETDEV,
    INITIATORNAME') -> {name: initiator name, '' when unset}."""
    ifaces = {}
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        fields = rest.split(",")
        if name and len(fields) >= 5:
            initiator = fields[4].strip()
            ifaces[name] = "" if initiator == "<empty>" else initiator
    return ifaces


async def iface_initiator_name(name: str, *, timeout: float,
                               runner: commands.Runner = commands.run) -> str | None:
    """The iface's initiator name ('' if unset), None if there is no such
    iface. Listed, not asked for by name: a missing iface is rc 6, the same
    as a busy database."""
    commands.check_arg(name, "ifaceName")
    result = await _db(runner, [ISCSIADM, "-m", "iface"], timeout=timeout,
                       ok_rcs=(0, ERR_NO_OBJS_FOUND))
    return parse_ifaces(result.text).get(name)


async def iface_create(name: str, initiator_name: str, *, timeout: float,
                       runner: commands.Runner = commands.run) -> None:
    commands.check_arg(name, "ifaceName")
    commands.check_arg(initiator_name, "initiatorName")
    base = [ISCSIADM, "-m", "iface", "-I", name]
    try:
        await _db(runner, [*base, "-o", "new"], timeout=timeout)
        await _db(runner, [*base, "-o", "update", "-n", "iface.initiatorname", "-v",
                           initiator_name], timeout=timeout)
    except commands.CommandError as e:
        raise ISCSISetupError(reason=f"cannot create iface {name}: {_reason(e)}") from None


async def iface_delete(name: str, *, timeout: float,
                       runner: commands.Runner = commands.run) -> None:
    commands.check_arg(name, "ifaceName")
    await _db(runner, [ISCSIADM, "-m", "iface", "-I", name, "-o", "delete"], timeout=timeout,
              ok_rcs=(0, ERR_NO_OBJS_FOUND))


# ---- sessions (sysfs) -----------------------------------------------------------------

# SCSI peripheral types the sd driver makes a disk of: disk, optical memory,
# reduced block commands, zoned block
DISK_TYPES = frozenset({0, 7, 14, 20})


@dataclass(frozen=True)
class ScsiDevice:
    hctl: str               # H:C:T:L
    type: int               # SCSI peripheral type (0 disk, 12 controller, ...)
    disk: str | None        # its block device (sdX), once the sd driver made it

    @property
    def lun(self) -> int:
        return int(self.hctl.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Session:
    sid: int
    iqn: str
    portal: Portal          # the persistent (configured) portal, with the session's tpgt
    iface: str
    initiator_name: str
    state: str              # LOGGED_IN, FAILED, FREE
    host: str               # SCSI host, e.g. "host3"
    devices: tuple[ScsiDevice, ...] = field(default=())
    # ALLOCATED until the first scan of the session's target has finished,
    # then SCANNED ('' on kernels that do not show it)
    target_state: str = ""

    @property
    def logged_in(self) -> bool:
        return self.state == LOGGED_IN

    @property
    def disks(self) -> tuple[str, ...]:
        """sdX of the session's LUNs."""
        return tuple(sorted(d.disk for d in self.devices if d.disk))

    @property
    def pending(self) -> tuple[str, ...]:
        """LUNs scanned (in sysfs) whose disk the sd driver has not made yet:
        it probes asynchronously, after the scan has returned."""
        return tuple(d.hctl for d in self.devices if d.disk is None and d.type in DISK_TYPES)

    def matches(self, iqn: str, p: Portal, iface: str) -> bool:
        return (self.iqn == iqn and self.portal.address == p.address
                and self.portal.port == p.port and self.iface == iface
                and (p.tpgt is None or self.portal.tpgt == p.tpgt))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def read_sessions(sysfs: Path = SYSFS) -> list[Session]:
    """Every iSCSI session the kernel has, from sysfs (blocking, but sysfs
    reads come from kernel memory; call through `sessions()` from async code)."""
    found: list[Session] = []
    sroot = sysfs / "class" / "iscsi_session"
    try:
        entries = sorted(sroot.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    for sdir in entries:
        m = re.fullmatch(r"session(\d+)", sdir.name)
        if not m:
            continue
        sid = int(m.group(1))
        iqn = _read(sdir / "targetname")
        conns = sorted((sysfs / "class" / "iscsi_connection").glob(f"connection{sid}:*"))
        if not iqn or not conns:
            continue   # the session is coming or going
        conn = conns[0]
        address = _read(conn / "persistent_address") or _read(conn / "address")
        port = _int_or_none(_read(conn / "persistent_port") or _read(conn / "port"))
        if not address or port is None:
            continue
        tpgt = _int_or_none(_read(sdir / "tpgt"))
        host = ""
        try:
            host = (sdir / "device").resolve().parent.name
        except OSError:
            pass
        if not host.startswith("host"):
            host = ""
        devices = []
        for ddir in sorted((sdir / "device").glob("target*/*:*:*:*")):
            if not re.fullmatch(r"\d+:\d+:\d+:\d+", ddir.name):
                continue
            blocks = sorted(b.name for b in (ddir / "block").glob("*"))
            dtype = _int_or_none(_read(ddir / "type"))
            devices.append(ScsiDevice(ddir.name, -1 if dtype is None else dtype,
                                      blocks[0] if blocks else None))
        found.append(Session(
            sid=sid, iqn=iqn,
            portal=Portal(strip_brackets(address).lower(), port,
                          tpgt if tpgt is not None and tpgt >= 0 else None),
            iface=_read(sdir / "ifacename") or DEFAULT_IFACE,
            initiator_name=_read(sdir / "initiatorname"),
            state=_read(sdir / "state"), host=host, devices=tuple(devices),
            target_state=_read(sdir / "target_state")))
    return found


async def sessions(*, timeout: float = 10.0, sysfs: Path = SYSFS) -> list[Session]:
    return await asyncio.wait_for(asyncio.to_thread(read_sessions, sysfs), timeout)


async def find_session(iqn: str, p: Portal, iface: str = DEFAULT_IFACE, *,
                       timeout: float = 10.0, sysfs: Path = SYSFS) -> Session | None:
    for s in await sessions(timeout=timeout, sysfs=sysfs):
        if s.matches(iqn, p, iface):
            return s
    return None


async def wait_disks_made(sid: int, *, timeout: float, interval: float = 0.1,
                          sysfs: Path = SYSFS,
                          fetch: Callable[[], Awaitable[list[Session]]] | None = None
                          ) -> Session | None:
    """Wait until every disk-type LUN of session `sid` has its block device
    (after a scan); returns the session (None if it went away). `fetch`
    replaces `sessions()` (a shared poll). Raises ResourceTimeout (851) at
    the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.1, deadline - time.monotonic())
        current = await fetch() if fetch else await sessions(timeout=left, sysfs=sysfs)
        found = [s for s in current if s.sid == sid]
        if not found or not found[0].pending:
            return found[0] if found else None
        if time.monotonic() >= deadline:
            raise ResourceTimeout(reason=f"LUNs {', '.join(found[0].pending)} of iSCSI session "
                                         f"{sid} got no disk within {timeout:g} s")
        await asyncio.sleep(interval)
