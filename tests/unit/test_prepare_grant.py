"""A prepare whose vm-group grant fails (storage.vm_group): nothing is left
prepared, and the volumes it activated are released (deactivated when no one
else uses them), not counted active for ever."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.locks import LockManager
from storage.connections import ConnectionManager
from storage.domains.base import VmAccess
from storage.domains.filedomain import FileDomain
from storage.domains.monitor import DomainMonitor, Entry
from storage.domains.prepared import PreparedVolumes
from storage.domains.registry import DomainRegistry
from storage.domains.volumes import VolumeOps
from storage.errors import StorageDomainAccessError
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


class CountingDomain(FileDomain):
    """A file domain that records which volumes are active and whose grant
    fails while `refuse` is set (a block domain's dm node it cannot change)."""

    refuse = False
    active_vols: set[str]

    async def activate_volumes(self, vols: list[VolumeMetadata], *,
                               refresh: bool = False) -> None:
        self.active_vols |= {v.uuid for v in vols}

    async def deactivate_volumes(self, vols: list[VolumeMetadata]) -> None:
        self.active_vols -= {v.uuid for v in vols}

    async def grant_access(self, vols: list[VolumeMetadata], access: VmAccess) -> None:
        if self.refuse:
            raise StorageDomainAccessError(sdUUID=self.uuid, reason="Input/output error")
        await super().grant_access(vols, access)


async def test_a_failed_grant_leaves_nothing_prepared_or_active(tmp_path: Path) -> None:
    io = IOPool("test", timeout=10)
    try:
        md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                            version=5, backup=False)
        domain = await CountingDomain.create(tmp_path / "mnt", md, io)
        domain.active_vols = set()
        img, base, top = new_id(), new_id(), new_id()
        for vol, parent in ((base, BLANK_UUID), (top, base)):
            await domain.write_volume_md(VolumeMetadata(
                domain=md.uuid, image=img, uuid=vol, parent=parent, format="RAW",
                allocation="SPARSE", voltype="LEAF", capacity=1 << 20, legality="LEGAL",
                generation=0, state="READY"))
            (domain.images / img / vol).write_bytes(b"")
        state = tmp_path / "state"
        state.mkdir()
        locks = LockManager()
        prepared = PreparedVolumes(state)
        registry = DomainRegistry(state, ConnectionManager(state, tmp_path / "root", locks,
                                                           io_timeout=10),
                                  locks, prepared, DomainMonitor(locks))
        manager = VolumeOps(registry, prepared, locks, vm_access=VmAccess(gid=0))
        registry.entries[md.uuid] = Entry(domain, None, active=True)

        # another user of the base volume (a clone of the same template)
        await prepared.use_volumes(domain, [await domain.volume(img, base)])
        domain.refuse = True
        with pytest.raises(StorageDomainAccessError):
            await manager.prepare(md.uuid, img, top, "vm")
        assert prepared.counts == {}
        assert domain.active_vols == {base}
        assert prepared.active_refs == {f"{md.uuid}/{base}": 1}

        # the same prepare once the grant works
        domain.refuse = False
        await manager.prepare(md.uuid, img, top, "vm")
        assert domain.active_vols == {base, top}
        assert prepared.active_refs == {f"{md.uuid}/{base}": 2, f"{md.uuid}/{top}": 1}
    finally:
        io.close()
