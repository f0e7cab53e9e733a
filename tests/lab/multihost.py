"""Simulated hosts sharing storage in the lab guest (issue 9).

A `SimHost` is what a separate machine would be, as far as the storage it
shares with the others can tell: a private mount namespace (a long-lived
`unshare --mount --propagation private` holder; every command of the host
runs through `nsenter --mount=/proc/PID/ns/mnt`) with private tmpfs over
the directories where daemons and tools keep per-machine state:

    /run/sanlock     the sanlock daemon's socket and pid file
    /run/lvm         LVM's hints and polling daemon
    /run/lock/lvm    LVM's file locks: another host's lvcreate is NOT
                     serialized by them, as on real separate machines
    /run/hostagent   the agent's run dir (sanlock killpath FIFOs)

Each host runs its own sanlock daemon (no watchdog, optional) and its own
agent (state dir, port, config with a `[leases]` section and a distinct
host id); the agent's mounts (NFS) exist only in its namespace.

Shared by all hosts, as the guest has only one of each: the kernel (device
mapper, so an LV another host activated is active here too; the one iscsid
and multipathd: every host sees the same LUN through the same map), /dev,
udev, the network (hosts differ by port on 127.0.0.1), /tmp (state dirs
live there). The agent mounts NFS with `nosharecache`, so each host has its
own superblock and caches; but every host is the same NFSv4 client to the
server, which therefore never recalls one host's delegation for another's
change: the `shared_storage` fixture turns delegations off (conftest.py).

`SimHost.kill()` is a power loss: every process in the namespace dies at
once (the agent's commands run in sessions of their own, outside its
process group).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess
from tests.lab import guestlib as g

PRIVATE_DIRS = ("/run/sanlock", "/run/lvm", "/run/lock/lvm", "/run/hostagent")
SANLOCK_SOCKET = "/run/sanlock/sanlock.sock"
RUN_DIR = "/run/hostagent"
# sanlock io_timeout of the lab's lockspaces: joining takes 2 x 1 s + 1 s
# instead of 21 s
IO_TIMEOUT = 1
# sanlock 3.8 (timeouts.c, paxos_lease.c): a paxos lease whose owner's host
# id is still held may be taken once the owner has not renewed its delta
# lease for host_dead_seconds = 8 x the owner's io_timeout + the watchdog
# fire timeout (60 s, the same on every host, watchdog or not), counted
# from the last renewal the taker's daemon saw ("last_live").
WATCHDOG_FIRE_TIMEOUT = 60


def host_dead_seconds(io_timeout: int = IO_TIMEOUT) -> int:
    return 8 * io_timeout + WATCHDOG_FIRE_TIMEOUT


def renewal_seconds(io_timeout: int = IO_TIMEOUT) -> int:
    """How often a daemon renews its delta lease, and reads the other
    hosts' (sanlock's id_renewal_seconds)."""
    return 2 * io_timeout


class Namespace:
    """A private mount namespace held open by a sleeping process, with a
    fresh tmpfs over each of `private`."""

    def __init__(self, name: str, private: Sequence[str] = PRIVATE_DIRS) -> None:
        self.name = name
        self.private = tuple(private)
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "namespace not started"
        return self.proc.pid

    def start(self) -> Namespace:
        for d in self.private:
            # created in the guest's /run: the namespace's copy shows them too
            os.makedirs(d, exist_ok=True)
        mounts = " && ".join(f"mount -t tmpfs -o mode=0755 {self.name}-run {d}"
                             for d in self.private)
        script = f"{mounts} && echo ready && exec sleep infinity"
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"namespace {self.name}: {line!r} "
                               f"{self.proc.stderr.read() if self.proc.stderr else ''}")
        return self

    def argv(self, *cmd: g.Arg) -> list[str]:
        """cmd run inside the namespace."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--",
                *(os.fspath(c) for c in cmd)]

    def run(self, *cmd: g.Arg, check: bool = True, timeout: float = 60) -> str:
        return g.run(*self.argv(*cmd), check=check, timeout=timeout)

    def run_ok(self, *cmd: g.Arg, timeout: float = 60) -> bool:
        return g.run_ok(*self.argv(*cmd), timeout=timeout)

    def pids(self) -> list[int]:
        """Every process in the namespace but the holder."""
        mine = os.readlink(f"/proc/{self.pid}/ns/mnt")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == mine:
                    found.append(int(entry))
            except OSError:
                continue    # gone meanwhile
        return found

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace (the holder stays)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def mounts(self) -> list[tuple[str, str]]:
        """(mount point, fs type) of every mount in the namespace."""
        found = []
        for line in Path(f"/proc/{self.pid}/mounts").read_text().splitlines():
            _dev, mnt, fstype, *_ = line.split()
            found.append((mnt.replace("\\040", " "), fstype))
        return found

    def close(self) -> None:
        """Kill the holder: the namespace and its mounts go with the last
        process in it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class NsAgentProcess(AgentProcess):
    """AgentProcess whose agent runs inside a namespace (nsenter execs it:
    the pid is the agent's, its process group holds its children)."""

    def __init__(self, ns: Namespace, state_dir: Path, **kw: Any) -> None:
        super().__init__(state_dir, **kw)
        self.ns = ns

    def argv(self) -> list[str]:
        return self.ns.argv(*super().argv())


class NsSanlock:
    """A sanlock daemon (no watchdog) inside a namespace: its socket is the
    namespace's /run/sanlock/sanlock.sock."""

    def __init__(self, ns: Namespace, name: str) -> None:
        self.ns = ns
        self.daemon = g.Daemon(f"sanlock-{name}", ns.argv(
            "sanlock", "daemon", "-D", "-w", "0", "-U", "root", "-G", "root"))

    def start(self) -> NsSanlock:
        self.daemon.start()
        g.wait_until(lambda: self.daemon.check_alive()
                     and self.ns.run_ok("sanlock", "client", "status"),
                     f"{self.daemon.name} daemon", 15)
        return self

    def alive(self) -> bool:
        return self.daemon.alive()

    def status(self) -> str:
        return self.ns.run("sanlock", "client", "status", timeout=30)

    def kill(self) -> None:
        """The machine dies: the daemon and its helper, at once, no release."""
        proc = self.daemon.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        proc = self.daemon.proc
        if proc is not None and proc.poll() is None:
            # -f 1: leave the lockspaces even if something still uses them
            self.ns.run_ok("sanlock", "client", "shutdown", "-f", "1", timeout=30)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.poll() is None:
            self.kill()


def sanlock_entries(status: str) -> dict[str, list[str]]:
    """`sanlock client status` split by kind: "s" lockspaces
    ("name:host_id:path:offset"), "r" resources, "p" client processes."""
    out: dict[str, list[str]] = {"s": [], "r": [], "p": []}
    for line in status.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in out:
            out[kind].append(rest.strip())
    return out


class SimHost:
    """One simulated machine: a namespace, optionally a sanlock daemon, an agent.

    backends: the agent's `leases.backends` (default: ["local", "sanlock"]
    with sanlock, else ["local"]); policy: `leases.policy` (default
    "sanlock" with sanlock, else "local"); config: more TOML sections for
    the agent ({"storage": {"monitor_interval": 5.0}}); io_timeout: the
    sanlock io_timeout of the lockspaces it joins and the areas it formats.
    """

    def __init__(self, name: str, host_id: int, workdir: Path, *, sanlock: bool = True,
                 backends: Sequence[str] | None = None, policy: str | None = None,
                 domain_lease_timeout: float = 120.0, io_timeout: int = IO_TIMEOUT,
                 config: dict[str, dict[str, Any]] | None = None) -> None:
        self.name = name
        self.host_id = host_id
        self.workdir = workdir
        self.with_sanlock = sanlock
        self.backends = list(backends or (["local", "sanlock"] if sanlock else ["local"]))
        self.policy = policy or ("sanlock" if sanlock else "local")
        self.domain_lease_timeout = domain_lease_timeout
        self.io_timeout = io_timeout
        self.extra_config = config or {}
        self.ns = Namespace(name)
        self.sanlock: NsSanlock | None = None
        self.agent = NsAgentProcess(self.ns, workdir / "state")
        self.agent.log_path = g.LOG_DIR / f"agent-{name}-{self.agent.port}.log"
        self.killed = False

    def config_toml(self) -> str:
        sections: dict[str, dict[str, Any]] = {
            "storage": {"block_extent_size": 8 * 1024 * 1024, "monitor_interval": 30.0},
            "ovf": {"max_tar_size": 16 * 1024 * 1024},
            # small LUNs: thin cow volumes start at 64 MiB, not VDSM's 2560 MiB
            "thin": {"chunk_size": 64 * 1024 * 1024},
            "leases": {"host_id": self.host_id, "backends": self.backends,
                       "policy": self.policy, "sanlock_socket": SANLOCK_SOCKET,
                       "run_dir": RUN_DIR, "io_timeout": self.io_timeout,
                       "domain_lease_timeout": float(self.domain_lease_timeout)},
        }
        for section, values in self.extra_config.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def start(self) -> SimHost:
        g.LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.ns.start()
        try:
            if self.with_sanlock:
                self.sanlock = NsSanlock(self.ns, self.name).start()
            state = self.agent.state_dir
            state.mkdir(parents=True, exist_ok=True)
            (state / "hostagent.toml").write_text(self.config_toml())
            self.agent.start(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def restart_agent(self) -> None:
        """Start the agent again after kill(), in the same namespace and state
        (the sanlock daemon is not brought back: use start_sanlock)."""
        self.agent = NsAgentProcess(self.ns, self.workdir / "state", port=self.agent.port)
        self.agent.log_path = g.LOG_DIR / f"agent-{self.name}-{self.agent.port}.log"
        self.agent.start(timeout=60)
        self.killed = False

    def client(self) -> Any:
        return self.agent.client()

    def sanlock_status(self) -> dict[str, list[str]]:
        assert self.sanlock is not None, f"{self.name} has no sanlock daemon"
        return sanlock_entries(self.sanlock.status())

    def kill(self) -> float:
        """The machine loses power: kill -9 of every process in its namespace
        at once (the agent, the sanlock daemon, and the agent's commands:
        qemu-img, lvm run in sessions of their own, outside the agent's
        process group); returns the monotonic time of the kill."""
        self.killed = True
        killed_at = time.monotonic()
        self.ns.kill_all()
        self.agent.kill()       # reaps it
        if self.sanlock is not None:
            self.sanlock.kill()
        g.wait_until(lambda: not self.ns.pids(), f"the processes of {self.name} to die", 10)
        return killed_at

    def stop(self) -> int | None:
        """Stop the agent (SIGTERM: it leaves its lockspaces), the sanlock
        daemon, the mounts left in the namespace, the namespace. Returns
        the agent's exit status (None: it was killed or not running)."""
        steps = g.Cleanup()
        steps.push(f"close namespace {self.name}", self.ns.close)
        if self.ns.proc is not None and self.ns.proc.poll() is None:
            steps.push(f"unmount {self.name}'s storage", self._umount_storage)
        if self.sanlock is not None:
            steps.push(f"stop {self.name}'s sanlock", self.sanlock.stop)
        rc: list[int | None] = [None]

        def stop_agent() -> None:
            if self.agent.proc is not None and self.agent.proc.poll() is None:
                rc[0] = self.agent.stop(timeout=60)
            elif self.agent.proc is not None:
                self.agent.kill()    # reap, close the notify socket
        steps.push(f"stop {self.name}'s agent", stop_agent)
        steps.run()
        return rc[0]

    def _umount_storage(self) -> None:
        # what the agent mounted (NFS) would otherwise be detached lazily when
        # the namespace dies, with I/O possibly still queued
        root = str(self.agent.state_dir)
        for mnt, _fstype in reversed(self.ns.mounts()):
            if mnt.startswith(root + "/"):
                if not self.ns.run_ok("umount", mnt, timeout=30):
                    self.ns.run("umount", "-l", mnt)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class SharedStorage:
    """What the simulated hosts share: the NFS export (v4.2) and one target
    with one LUN, reached on both portals (a multipath map of two paths).
    Connection ids are the same on every host, as an engine would send."""

    NFS_SPEC = "127.0.0.1:/export"    # NFSv4: the export under the server's pseudo-root

    def __init__(self, export: Path, target: g.Target) -> None:
        self.export = export          # the exported directory, seen on the server side
        self.target = target
        self.nfs = {"id": str(uuid.uuid4()), "connection": self.NFS_SPEC,
                    "protocol_version": "4.2"}
        self.iscsi = [{"id": str(uuid.uuid4()), "connection": portal.split(":")[0],
                       "port": int(portal.split(":")[1]), "iqn": target.iqn}
                      for portal in g.PORTALS]

    async def connect(self, client: Any) -> str:
        """Connect a host's agent to the export and the LUN; returns the LUN's guid."""
        st = await client.call("connectStorageServer", domType="nfs",
                               connectionParams=[self.nfs])
        assert [s["status"] for s in st] == [0], st
        st = await client.call("connectStorageServer", domType="iscsi",
                               connectionParams=self.iscsi)
        assert [s["status"] for s in st] == [0] * len(self.iscsi), st
        [lun] = [d for d in await client.call("getDeviceList")
                 if {p["iqn"] for p in d["pathlist"]} == {self.target.iqn}]
        return str(lun["guid"])

    def lun_map(self) -> str | None:
        """/dev/mapper path of the LUN's multipath map, if logged in."""
        disks = {d for s in g.Initiator.sessions(self.target) for d in s.disks}
        for wwid in {g.disk_wwid(d) for d in disks}:
            name = g.Multipathd.map_name(wwid)
            if name:
                return f"/dev/mapper/{name}"
        return None

    def vgs(self) -> list[str]:
        """VGs on the LUN (block domains made on it)."""
        path = self.lun_map()
        if path is None:
            return []
        out = g.run("lvm", "pvs", "--noheadings", "-o", "vg_name", path, check=False)
        return [v for v in out.split() if v]


class HostFactory:
    """The `sim_hosts` fixture: sim_hosts(name, host_id, sanlock=True, **SimHost
    kw) -> a started SimHost, made under workdir/name."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: list[SimHost] = []

    def __call__(self, name: str, host_id: int, **kw: Any) -> SimHost:
        host = SimHost(name, host_id, self.workdir / name, **kw)
        self.made.append(host)
        return host.start()

    def stop(self, *hosts: SimHost) -> None:
        """Stop hosts at once (each leaves its lockspaces: seconds); an agent
        that did not exit 0 after SIGTERM is an error (not one killed)."""
        for host in hosts:
            self.made.remove(host)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
            errors = [e for e in pool.map(_stop_host, hosts) if e]
        if errors:
            raise RuntimeError("\n".join(errors))

    def stop_all(self) -> None:
        self.stop(*self.made)


def _stop_host(host: SimHost) -> str:
    killed = host.killed
    try:
        rc = host.stop()
    except Exception as e:
        return f"host {host.name}: {e}"
    if not killed and rc != 0:
        return f"host {host.name}: agent exit status {rc}; log:\n{host.agent.log()[-5000:]}"
    return ""
