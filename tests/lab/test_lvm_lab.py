"""storage.lvm with real activation, in the lab guest, on a multipath device
over two iSCSI paths."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from storage import lvm
from tests.lab import guestlib as g

MiB = 1 << 20


async def test_lv_activate_io_extend_remove(lvm_device: str) -> None:
    mgr = lvm.LVM(devices=[lvm_device], activation=True, timeout=120)
    vg = f"vg-{uuid.uuid4().hex[:8]}"
    await mgr.pvcreate([lvm_device], metadata_size=16 * MiB, data_alignment=MiB)
    await mgr.vgcreate(vg, [lvm_device], extent_size=4 * MiB, tags=["LAB"])
    [pv] = await mgr.pvs(vg)
    assert pv.name == lvm_device   # the map, not one of its sdX paths

    await mgr.lvcreate(vg, "data", 16 * MiB, tags=["IU_lab"])
    lv = await mgr.lv(vg, "data")
    assert lv.active is False
    node = Path(f"/dev/{vg}/data")
    assert not node.exists()

    await mgr.activate(vg, ["data"])
    assert (await mgr.lv(vg, "data")).active is True
    assert node.exists()
    data = os.urandom(MiB)
    g.direct_write(node, data, offset=4 * MiB)
    assert g.direct_read(node, MiB, offset=4 * MiB) == data

    await mgr.deactivate(vg, ["data"])
    assert (await mgr.lv(vg, "data")).active is False
    assert not node.exists()

    await mgr.activate(vg, ["data"])
    assert g.direct_read(node, MiB, offset=4 * MiB) == data
    await mgr.lvextend(vg, "data", 40 * MiB)
    assert int(g.run("blockdev", "--getsize64", node)) == 40 * MiB
    assert (await mgr.lv(vg, "data")).size == 40 * MiB
    # the data before the extension is still there
    assert g.direct_read(node, MiB, offset=4 * MiB) == data

    await mgr.lvcreate(vg, "active", 8 * MiB, activate=True, zero=True)
    assert g.direct_read(f"/dev/{vg}/active", MiB) == bytes(MiB)
    await mgr.deactivate(vg, ["data", "active"])
    assert not node.exists()
    assert all(lv.active is False for lv in await mgr.lvs(vg))

    await mgr.lvremove(vg, ["data", "active"])
    assert await mgr.lvs(vg) == []
    await mgr.vgremove(vg)
    await mgr.pvremove([lvm_device])
    assert await mgr.pvs() == []
