"""storage.qemuimg.measure: how a volume's own layer is asked for (with a
fake runner; the figures themselves are checked against qemu-img in
tests/integration/test_volume_life.py)."""

from __future__ import annotations

import json

import pytest

from storage import qemuimg
from tests.unit.fakerun import FakeRunner, table

OUT = json.dumps({"required": 4521984, "fully-allocated": 67436544, "bitmaps": 0})


@pytest.mark.parametrize("block, driver", [(False, "file"), (True, "host_device")])
async def test_one_layer_is_opened_with_no_backing(block: bool, driver: str) -> None:
    fake = FakeRunner(table((["qemu-img"], (0, OUT, ""))))
    m = await qemuimg.measure(path="/images/a b/vol", src_fmt="qcow2", dst_fmt="qcow2",
                              backing=False, block=block, runner=fake)
    assert m == {"required": 4521984, "fully-allocated": 67436544, "bitmaps": 0}
    [argv] = fake.argvs("prlimit")
    image = argv[-1]
    assert image.startswith("json:") and "-f" not in argv
    assert json.loads(image[len("json:"):]) == {
        "driver": "qcow2", "backing": None,
        "file": {"driver": driver, "filename": "/images/a b/vol"}}


async def test_chain_and_raw_are_opened_by_name() -> None:
    fake = FakeRunner(table((["qemu-img"], (0, OUT, ""))))
    await qemuimg.measure(path="/v", src_fmt="qcow2", dst_fmt="raw", runner=fake)
    # a raw volume has no backing to leave out
    await qemuimg.measure(path="/v", src_fmt="raw", dst_fmt="raw", backing=False, runner=fake)
    assert [a[-3:] for a in fake.argvs("prlimit")] == [["-f", "qcow2", "/v"],
                                                      ["-f", "raw", "/v"]]
