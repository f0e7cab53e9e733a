"""Test seams for the block storage wrappers: a fake `commands.Runner` that
records every call and answers from a function of the argv (with run()'s
rules for rc, ok_rcs and redaction, so wrappers see what they would see from
real tools), and a fake sysfs tree with iSCSI sessions like the kernel's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import commands

Answer = tuple[int, str, str]   # rc, stdout, stderr
log = logging.getLogger("storage.commands")


@dataclass
class Call:
    argv: list[str]
    kwargs: dict[str, Any]


@dataclass
class FakeRunner:
    respond: Callable[[list[str]], Answer] = lambda argv: (0, "", "")
    calls: list[Call] = field(default_factory=list)

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       ok_rcs: Collection[int] = (0,), check: bool = True,
                       rc_names: Mapping[int, str] | None = None,
                       redact: Sequence[str] = (), **kwargs: Any) -> commands.CommandResult:
        assert timeout > 0
        argv = list(argv)
        self.calls.append(Call(argv, {"timeout": timeout, "redact": list(redact), **kwargs}))
        rc, out, err = self.respond(argv)
        shown = commands.redact_argv(argv, redact)
        # what commands.run logs, so tests can check the log for secrets
        log.debug("%s: rc=%d", " ".join(shown), rc)
        if check and rc not in ok_rcs:
            raise commands.CommandError(argv, rc, out.encode(), err.encode(),
                                        rc_names=rc_names, redact=redact)
        return commands.CommandResult(shown, rc, out.encode(), err.encode())

    def argvs(self, prog: str | None = None) -> list[list[str]]:
        return [c.argv for c in self.calls if prog is None or c.argv[0] == prog]


@dataclass
class FakeChild:
    """What `commands.start` returns, for a child that runs until killed
    (or exits at once with `rc` and `err` on stderr)."""

    argv: list[str]
    rc: int | None = None
    err: bytes = b""
    pid: int = 4242
    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None
    killed: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        self.stderr = asyncio.StreamReader()
        self.stderr.feed_data(self.err)
        if self.rc is not None:
            self.stderr.feed_eof()

    @property
    def returncode(self) -> int | None:
        return self.rc

    async def wait(self) -> int:
        assert self.rc is not None, "waited for a child that was neither killed nor done"
        return self.rc

    def kill(self) -> None:
        self.killed = True
        if self.rc is None:
            self.rc = -9
            assert self.stderr is not None
            self.stderr.feed_eof()

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSpawner:
    """A fake `commands.Spawner`: `start(argv)` makes the child (and may make
    what the real program would, e.g. a socket file)."""

    start: Callable[[list[str]], FakeChild] = lambda argv: FakeChild(argv)
    children: list[FakeChild] = field(default_factory=list)

    async def __call__(self, argv: Sequence[str], **kwargs: Any) -> FakeChild:
        child = self.start(list(argv))
        self.children.append(child)
        return child


def table(*rules: tuple[Sequence[str], Answer | Callable[[list[str]], Answer]]
          ) -> Callable[[list[str]], Answer]:
    """Answers by the first rule whose words all appear in order in the argv;
    (0, '', '') when none matches."""
    def respond(argv: list[str]) -> Answer:
        for words, answer in rules:
            it = iter(argv)
            if all(any(w == a for a in it) for w in words):
                return answer(argv) if callable(answer) else answer
        return (0, "", "")
    return respond


def make_session(sysfs: Path, sid: int, host: int, iqn: str, address: str, port: int,
                 luns: dict[str, tuple[int, str | None]], *, tpgt: int = 1,
                 iface: str = "default", state: str = "LOGGED_IN",
                 target_state: str = "SCANNED") -> None:
    """A sysfs layout like the kernel's: the class entry links to the
    session under its SCSI host, LUNs under target<host>:0:0."""
    sdev = sysfs / "devices" / "platform" / f"host{host}" / f"session{sid}"
    sclass = sdev / "iscsi_session" / f"session{sid}"
    sclass.mkdir(parents=True)
    for name, value in (("targetname", iqn), ("tpgt", str(tpgt)), ("ifacename", iface),
                        ("initiatorname", "iqn.1993-08.org.debian:01:host"),
                        ("state", state), ("target_state", target_state)):
        (sclass / name).write_text(value + "\n")
    (sclass / "device").symlink_to(sdev)
    links = sysfs / "class" / "iscsi_session"
    links.mkdir(parents=True, exist_ok=True)
    (links / f"session{sid}").symlink_to(sclass)
    conn = sysfs / "class" / "iscsi_connection" / f"connection{sid}:0"
    conn.mkdir(parents=True)
    (conn / "persistent_address").write_text(address + "\n")
    (conn / "persistent_port").write_text(f"{port}\n")
    target = sdev / f"target{host}:0:0"
    for hctl_lun, (dtype, disk) in luns.items():
        d = target / f"{host}:0:0:{hctl_lun}"
        d.mkdir(parents=True)
        (d / "type").write_text(f"{dtype}\n")
        if disk:
            (d / "block" / disk).mkdir(parents=True)
