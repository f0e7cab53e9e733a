"""A recovery that fails part way says so (the job registry runs it again),
after doing what it could."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from storage import commands
from storage.domains import recovery
from storage.metadata import READY

SD, IMG, DISK, LAYER = "sd", "img", "disk-top", "layer"
DST = {"sdUUID": "bak", "imgUUID": "bimg", "volUUID": "bvol"}


class FakeDomain:
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.layer = SimpleNamespace(uuid=LAYER, parent=DISK, state=READY,
                                     description=f"backup {DST['volUUID']}", ctime=1000)

    async def image_volumes(self, img: str) -> list[Any]:
        return [] if LAYER in self.deleted else [self.layer]

    async def volume(self, img: str, vol: str) -> Any:
        raise recovery.HostAgentError()        # the backup volume never got made

    async def children(self, v: Any) -> list[Any]:
        return []

    async def chain(self, img: str, vol: str) -> list[Any]:
        return [self.layer]

    def volume_path(self, img: str, vol: str) -> str:
        return f"/dev/null/{vol}"

    async def delete_volume(self, img: str, vol: str) -> None:
        self.deleted.append(vol)


@contextlib.asynccontextmanager
async def nothing(*args: Any, **kw: Any) -> AsyncIterator[None]:
    yield


async def test_backup_recovery_raises_after_a_failed_map_and_succeeds_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    domain = FakeDomain()

    async def garbage(sd: str) -> None:
        return None

    async def get_domain(sd: str) -> FakeDomain:
        return domain
    ops: Any = SimpleNamespace(
        registry=SimpleNamespace(collect_garbage=garbage, domain=get_domain),
        prepared=SimpleNamespace(is_prepared=lambda *a: False, using=nothing,
                                 switching=lambda *a: False),
        locks=SimpleNamespace(hold=nothing), runner=None)
    fail = True

    async def map_(path: str, **kw: Any) -> list[dict[str, Any]]:
        if fail:
            raise commands.CommandError(["qemu-img", "map"], 1, b"",
                                        b"qemu_thread_create: Resource temporarily unavailable")
        return [{"data": False, "depth": 0}]
    monkeypatch.setattr(recovery.qemuimg, "map_", map_)
    params = {"sources": [{"sdUUID": SD, "imgUUID": IMG, "volUUID": DISK}], "targets": [DST]}

    with pytest.raises(recovery.RecoveryIncomplete, match="sd/img"):
        await recovery.recover_backup(ops, params, started=1000.0)
    assert domain.deleted == []
    fail = False
    await recovery.recover_backup(ops, params, started=1000.0)
    assert domain.deleted == [LAYER]
