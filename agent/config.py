"""Typed configuration: defaults, a TOML file, conf.d/*.toml drop-ins.

Loaded once in main() and passed down; nothing reads configuration at import
time. Unknown sections or keys and wrong types are errors naming the key, so
a typo in /etc/hostagent/hostagent.toml stops the agent instead of being
silently ignored.

Each setting is declared once: its type is its dataclass annotation (checked
on load), and every number has its range in RANGES (a unit test fails on a
number without one). A table over the stdlib dataclasses rather than a
validation library: pydantic would be a second model of the same settings and
a compiled dependency on every host for some thirty numbers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/hostagent/hostagent.toml")
MiB = 1 << 20
TiB = 1 << 40


class ConfigError(Exception):
    pass


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"  # noqa: S104 - the engine reaches the agent over the network
    port: int = 54321
    # Plain HTTP is allowed only when this is false and host is a loopback address.
    tls: bool = True
    ca_file: str = "/etc/pki/hostagent/ca.pem"
    cert_file: str = "/etc/pki/hostagent/server.pem"
    key_file: str = "/etc/pki/hostagent/server.key"
    max_body_bytes: int = 4 * 1024 * 1024
    # Host name put in URLs the agent hands out (OVF upload tickets); empty:
    # the listening address, or this host's name when listening on all.
    public_host: str = ""
    max_ws_clients: int = 2000
    # Outgoing notifications queued per WebSocket client before it is dropped
    # as too slow.
    ws_queue_size: int = 1000
    shutdown_timeout: float = 5.0
    # A connection is closed when no complete request head arrives this long
    # after it opened or after the last response (slow or idle clients).
    idle_timeout: float = 30.0
    # A JSON-RPC request body must arrive within this many seconds (408).
    body_timeout: float = 30.0
    # A TLS handshake must be done within this many seconds (both listeners);
    # at most max_peer_handshakes run at once per client address.
    handshake_timeout: float = 5.0
    max_peer_handshakes: int = 128


@dataclass
class JobsConfig:
    max_running: int = 10
    # Ended jobs are forgotten this long after they end (clearJob forgets at once).
    keep_ended_seconds: float = 3600.0
    # On SIGTERM running jobs get this long to finish before they are cancelled.
    shutdown_grace_seconds: float = 10.0
    # Progress notifications per job are sent at most this often.
    progress_interval: float = 1.0


@dataclass
class StorageConfig:
    state_dir: str = "/var/lib/hostagent"
    # Mount points and links of storage connections live under this directory.
    storage_root: str = "/var/lib/hostagent/storage"
    command_timeout: float = 120.0
    # mount/umount and iSCSI logins: bounded, a dead server fails the call.
    mount_timeout: float = 120.0
    # At start-up, how long the agent waits for its recorded connections to
    # be checked or re-established before it answers; one still at it (a
    # server down: a mount waits up to mount_timeout) goes on meanwhile.
    connect_wait: float = 30.0
    # One small I/O check on storage (access tests, monitoring reads).
    io_timeout: float = 30.0
    # How often each active domain's metadata is read back (monitoring).
    monitor_interval: float = 10.0
    # LVM extent size of new block domains.
    block_extent_size: int = 128 * 1024 * 1024
    # Who opens prepared volumes besides root: this group (Debian's libvirt
    # runs qemu as libvirt-qemu:kvm; VDSM's model is vdsm:kvm). A prepare
    # gives it the volume files (vm_file_mode) and r-x on the directories
    # from the domain down to them. "": root only.
    vm_group: str = "kvm"
    vm_file_mode: int = 0o660


@dataclass
class ThinConfig:
    # Sparse cow volumes on block domains start at one chunk (or createVolume's
    # initialSize) and are grown by a chunk when less than watermark_percent
    # of a chunk is free (VDSM's defaults: 2560 MiB, 20%).
    chunk_size: int = 2560 * 1024 * 1024
    watermark_percent: int = 20
    # The nice value of the commands a writing VM waits on (an extension's
    # lvextend, an LV's reload): they start ahead of the VMs' own work on a
    # busy host (vdsmd runs at -20 altogether). 0: as every other command.
    urgent_nice: int = -10
    # Those commands (and a new volume's lvcreate, in another) go to an
    # `lvm` shell kept running (lvm2's shell, as lvmdbusd's): no lvm to
    # start for each (most of an lvextend's time on a busy host). false:
    # each is spawned, as every other command.
    lvm_shell: bool = True


@dataclass
class OvfConfig:
    # Largest OVF tar a domain's store takes. The store volume holds two
    # slots of this size (sparse on file domains).
    max_tar_size: int = 1024 * 1024 * 1024
    # Largest single member (one OVF) of a tar.
    max_member_size: int = 64 * 1024 * 1024
    # An upload ticket is good for one upload within this many seconds.
    ticket_ttl: float = 300.0
    # Port of the OVF data listener (on server.host, same TLS): uploads and
    # downloads with the TLS work in threads, off the event loop; upload
    # URLs name it. 0: any free port (dev mode); -1: none (URLs name
    # server.port, which serves /ovfstore too).
    data_port: int = 54322


@dataclass
class TransfersConfig:
    # A disk transfer's ticket (startTransfer's url) closes this long after
    # it opened, however busy (imageio's tickets expire too; the engine
    # opens a new transfer for a longer copy).
    ticket_lifetime: float = 24 * 3600.0
    # ... and after this many seconds without a request, unless startTransfer
    # asks for another inactivityTimeout, at most max_inactivity_timeout.
    inactivity_timeout: float = 60.0
    max_inactivity_timeout: float = 24 * 3600.0


@dataclass
class LeasesConfig:
    # This host's id in every domain's lockspace (1..2000 on 512-byte
    # storage, 1..250 on 4K): unique among the hosts sharing storage, the
    # same on every domain. The engine's host number.
    host_id: int = 1
    # Lock backends this host has: "local" (file locks, no daemon) always;
    # add "sanlock" where the sanlock daemon runs. A domain whose lock
    # policy is not here is refused for every write.
    backends: list[str] = field(default_factory=lambda: ["local"])
    # Lock policy recorded in new domains' metadata.
    policy: str = "local"
    sanlock_socket: str = "/run/sanlock/sanlock.sock"
    # Where the agent keeps the fifo sanlock's kill path writes to.
    run_dir: str = "/run/hostagent"
    # sanlock's io_timeout for new lockspaces (seconds); a lease expires
    # 8 io_timeouts after its holder stops renewing it.
    io_timeout: int = 10
    # How long an operation waits for a domain's metadata lease another host
    # holds (domain metadata changes are short); a volume's lease is not
    # waited for: a write to a volume another host writes fails with 651.
    domain_lease_timeout: float = 60.0
    # How often the local backend verifies the locks it holds (a lock found
    # gone, or storage failing for 8 io_timeouts, loses the lease and stops
    # the work under it). sanlock renews and watches its own.
    check_interval: float = 10.0


@dataclass
class LoggingConfig:
    level: str = "INFO"
    # Extra per-logger levels, e.g. {"storage.commands" = "DEBUG"}.
    levels: dict[str, str] = field(default_factory=dict)


@dataclass
class DebugConfig:
    # Verbs that exist only to test the agent itself (a stepped job, a verb
    # that raises). Never enable in production.
    test_verbs: bool = False
    # Domains take no leases at all (benchmarks measure what leases cost).
    # Never in production: hosts sharing storage would not be kept apart.
    no_leases: bool = False


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    thin: ThinConfig = field(default_factory=ThinConfig)
    ovf: OvfConfig = field(default_factory=OvfConfig)
    transfers: TransfersConfig = field(default_factory=TransfersConfig)
    leases: LeasesConfig = field(default_factory=LeasesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    dev: bool = False

    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The effective configuration, as a TOML document."""
        lines: list[str] = []
        data = self.to_dict()
        for key, value in data.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {_toml_value(value)}")
        for section, values in data.items():
            if not isinstance(values, dict):
                continue
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def validate(self) -> None:
        for name, declared, value in settings(self):
            if is_number(declared):
                RANGES[name].check(name, value)
        s = self.server
        if not s.tls and not is_loopback(s.host):
            raise ConfigError(
                f"server.tls is false but server.host {s.host!r} is not a loopback "
                "address: plain HTTP is allowed only on loopback")
        if self.thin.chunk_size % MiB:
            raise ConfigError("thin.chunk_size: must be whole MiB")
        le = self.leases
        for name in le.backends:
            if name not in ("local", "sanlock"):
                raise ConfigError(f"leases.backends: unknown backend {name!r} "
                                  "(local, sanlock)")
        if "local" not in le.backends:
            raise ConfigError("leases.backends: must include \"local\"")
        if le.policy not in le.backends:
            raise ConfigError(f"leases.policy: {le.policy!r} is not one of leases.backends")
        xfer = self.transfers
        if xfer.inactivity_timeout > xfer.max_inactivity_timeout:
            raise ConfigError("transfers.inactivity_timeout: more than "
                              "transfers.max_inactivity_timeout")
        if self.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"logging.level: unknown level {self.logging.level!r}")


@dataclass(frozen=True)
class Range:
    """Where a number may be: at least `low` (more than it when `open_low`),
    at most `high`; None: unbounded."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def check(self, name: str, value: float) -> None:
        if self.open_low and self.low is not None and not value > self.low:
            raise ConfigError(f"{name}: {value!r} must be more than {self.low!r}")
        if self.low is not None and value < self.low:
            raise ConfigError(f"{name}: {value!r} must be at least {self.low!r}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"{name}: {value!r} must be at most {self.high!r}")


MiB = 1024 * 1024
POSITIVE = Range(0, open_low=True)
NOT_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)

# The range of every number of the configuration, "section.key".
RANGES: dict[str, Range] = {
    "server.port": Range(1, 65535),
    "server.max_body_bytes": Range(1024),
    "server.max_ws_clients": AT_LEAST_1,
    "server.ws_queue_size": AT_LEAST_1,
    "server.shutdown_timeout": NOT_NEGATIVE,
    "server.idle_timeout": POSITIVE,
    "server.body_timeout": POSITIVE,
    "server.handshake_timeout": POSITIVE,
    "server.max_peer_handshakes": AT_LEAST_1,
    "jobs.max_running": AT_LEAST_1,
    "jobs.keep_ended_seconds": NOT_NEGATIVE,
    "jobs.shutdown_grace_seconds": NOT_NEGATIVE,
    "jobs.progress_interval": POSITIVE,
    "storage.command_timeout": POSITIVE,
    "storage.mount_timeout": POSITIVE,
    "storage.connect_wait": POSITIVE,
    "storage.io_timeout": POSITIVE,
    # 0 would read every domain's metadata in a busy loop
    "storage.monitor_interval": POSITIVE,
    # sizes are divided by it; LVM takes no extent under 1 KiB, 1 MiB keeps VGs sane
    "storage.block_extent_size": Range(MiB),
    "storage.vm_file_mode": Range(0, 0o777),
    "thin.chunk_size": Range(16 * MiB, TiB),
    "thin.watermark_percent": Range(1, 99),
    "thin.urgent_nice": Range(-20, 0),
    "ovf.max_tar_size": Range(MiB),
    "ovf.max_member_size": AT_LEAST_1,
    "ovf.ticket_ttl": POSITIVE,
    # -1: no data listener, 0: any free port
    "ovf.data_port": Range(-1, 65535),
    # a ticket of less than a second could not serve one request; a year is
    # more than any copy, and a ticket is a credential
    "transfers.ticket_lifetime": Range(1, 365 * 24 * 3600),
    "transfers.inactivity_timeout": Range(1, 24 * 3600),
    "transfers.max_inactivity_timeout": Range(1, 24 * 3600),
    "leases.host_id": Range(1, 2000),
    "leases.io_timeout": Range(1, 300),
    "leases.domain_lease_timeout": NOT_NEGATIVE,
    "leases.check_interval": POSITIVE,
}


def settings(obj: Any, where: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    """(section.key, declared type, value) of every setting under obj."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings(value, f"{where}{f.name}.")
        else:
            yield f"{where}{f.name}", hints[f.name], value


def is_number(declared: Any) -> bool:
    return declared in (int, float)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"{name}: unknown setting")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a table")
            _apply(current, value, f"{name}.")
            continue
        expected = typing.get_origin(hints[key]) or hints[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is dict:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{name}: expected a table of strings")
        elif expected is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}: expected a list of strings")
        elif type(value) is not expected:
            raise ConfigError(f"{name}: expected {expected.__name__}, got {type(value).__name__}")
        setattr(obj, key, value)


def config_files(path: Path) -> list[Path]:
    """The main file (if it exists) and its conf.d/*.toml drop-ins, sorted."""
    files = [path] if path.exists() else []
    dropins = path.parent / "conf.d"
    if dropins.is_dir():
        files.extend(sorted(dropins.glob("*.toml")))
    return files


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file, then each drop-in, then `overrides`."""
    config = Config()
    for f in config_files(path or DEFAULT_CONFIG_FILE):
        try:
            data = tomllib.loads(f.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{f}: {e}") from e
        try:
            _apply(config, data, "")
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from e
    if overrides:
        _apply(config, overrides, "")
    config.validate()
    return config


def dev_overrides(state_dir: Path, port: int) -> dict[str, Any]:
    """Dev mode: loopback listener with mTLS, everything under state_dir."""
    state = state_dir.resolve()
    pki = state / "pki"
    return {
        "dev": True,
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "tls": True,
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / "server.pem"),
            "key_file": str(pki / "server.key"),
        },
        "storage": {
            "state_dir": str(state),
            "storage_root": str(state / "storage"),
        },
    }
