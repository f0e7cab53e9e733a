"""storage.lvm with a fake runner: argv, config, report parsing, checks,
cache invalidation, per-VG locking and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from storage import commands, lvm
from storage.errors import CannotCreateLogicalVolume, InvalidParameter, LVMCommandError
from tests.polling import until

# Captured from lvm 2.03.16 (Debian 12) with activation=0 on a loop device; the
# lv2 and lv3 rows (active and open, inactive) follow the same format by hand.
PVS_JSON = b"""  {
      "report": [
          {
              "pv": [
                  {"pv_name":"/dev/loop0", "pv_uuid":"ZgS3S1-FGcZ-Cmae-W36S-5QCi-jxK6-HCrPcY", \
"vg_name":"vgA", "vg_uuid":"jc16Hq-uDbO-vH2s-uiyf-cZrR-XdNa-tuYgwX", "pv_size":"515899392", \
"pv_free":"503316480", "pe_start":"17825792", "dev_size":"536870912", "pv_pe_count":"123", \
"pv_pe_alloc_count":"3", "pv_mda_count":"1", "pv_mda_size":"17821696", \
"pv_mda_free":"8908800", "pv_tags":""}
              ]
          }
      ]
  }
"""
VGS_JSON = b"""  {
      "report": [
          {
              "vg": [
                  {"vg_name":"vgA", "vg_uuid":"jc16Hq-uDbO-vH2s-uiyf-cZrR-XdNa-tuYgwX", \
"vg_attr":"wz--n-", "vg_size":"515899392", "vg_free":"503316480", "vg_extent_size":"4194304", \
"vg_extent_count":"123", "vg_free_count":"120", "vg_tags":"MDT_A=1,x/y", "pv_count":"1", \
"lv_count":"1", "vg_mda_size":"17821696", "vg_mda_free":"8908800"}
              ]
          }
      ]
  }
"""
LVS_JSON = b"""  {
      "report": [
          {
              "lv": [
                  {"lv_name":"lv9", "vg_name":"vgA", \
"lv_uuid":"diorBb-pizA-3jbn-0nrP-8KVy-txYg-TOuWTC", \
"lv_size":"12582912", "lv_tags":"IU_x,T1", "lv_attr":"-wi-XX----", "lv_active":"unknown", \
"lv_path":"/dev/vgA/lv9"},
                  {"lv_name":"lv2", "vg_name":"vgA", \
"lv_uuid":"yGLByT-Cfv3-9K9K-hjOc-AJiC-D6f2-f3eyvJ", \
"lv_size":"8388608", "lv_tags":"", "lv_attr":"-wi-ao----", "lv_active":"active", \
"lv_path":"/dev/vgA/lv2"},
                  {"lv_name":"lv3", "vg_name":"vgA", \
"lv_uuid":"aGLByT-Cfv3-9K9K-hjOc-AJiC-D6f2-f3eyvJ", \
"lv_size":"8388608", "lv_tags":"", "lv_attr":"-wi-------", "lv_active":"", \
"lv_path":"/dev/vgA/lv3"}
              ]
          }
      ]
  }
"""
ACTIVATION_WARNING = (b"  WARNING: Activation disabled. No device-mapper interaction will be"
                      b" attempted.\n")


class FakeRunner:
    """Records every call; answers reports with the samples above, and fails
    a command whose subcommand is in `fail` with (rc, stderr)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.fail: dict[str, tuple[int, bytes]] = {}
        self.delay = 0.0
        self.running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}
        self.gate: asyncio.Event | None = None

    async def __call__(self, argv: Sequence[str], **kwargs: Any) -> commands.CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        self.kwargs.append(kwargs)
        op = argv[1]
        self.running[op] = self.running.get(op, 0) + 1
        self.max_running[op] = max(self.max_running.get(op, 0), self.running[op])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.gate is not None and op.endswith("s"):
                await self.gate.wait()
        finally:
            self.running[op] -= 1
        if op in self.fail:
            rc, err = self.fail[op]
            raise commands.CommandError(argv, rc, b"", err, rc_names=kwargs.get("rc_names"))
        out = {"pvs": PVS_JSON, "vgs": VGS_JSON, "lvs": LVS_JSON}.get(op, b"")
        return commands.CommandResult(tuple(argv), 0, out, ACTIVATION_WARNING)

    def ops(self) -> list[str]:
        return [c[1] for c in self.calls]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lv_mgr(runner: FakeRunner, clock: Clock) -> lvm.LVM:
    return lvm.LVM(runner, devices=["/dev/mapper/360014051", "/dev/loop7"], activation=True,
                   timeout=30, cache_ttl=10, clock=clock)


def args_after_config(argv: Sequence[str]) -> list[str]:
    assert argv[0] == "lvm"
    assert argv[2] == "--config"
    return list(argv[4:])


# --- config ------------------------------------------------------------------------------


def test_config_filter_has_exactly_the_devices(lv_mgr: lvm.LVM) -> None:
    cfg = lv_mgr.config
    assert 'filter=["a|^/dev/mapper/360014051$|","a|^/dev/loop7$|","r|.*|"]' in cfg
    assert cfg.count("a|") == 2
    assert "use_devicesfile=0" in cfg
    assert 'hints="none"' in cfg
    assert "activation=0" not in cfg
    # obsolete in LVM 2.03: must not be set
    assert "use_lvmetad" not in cfg
    assert "locking_type" not in cfg


def test_config_activation_disabled(runner: FakeRunner) -> None:
    mgr = lvm.LVM(runner, devices=["/dev/loop1"], activation=False)
    assert "global { prioritise_write_locks=1 wait_for_locks=1 activation=0 }" in mgr.config


def test_config_no_devices_filter_when_none(runner: FakeRunner) -> None:
    assert "filter=" not in lvm.LVM(runner).config


def test_config_empty_devices_rejects_everything(runner: FakeRunner) -> None:
    assert 'filter=["r|.*|"]' in lvm.LVM(runner, devices=[]).config


def test_config_escapes_regex_characters(runner: FakeRunner) -> None:
    cfg = lvm.LVM(runner, devices=["/dev/disk/by-id/a.b+c"]).config
    assert '"a|^/dev/disk/by-id/a[.]b[+]c$|"' in cfg


@pytest.mark.parametrize("device", [
    "loop0", "/dev/a|b", '/dev/a"b', "/dev/a b", "/dev/a\nb", "-/dev/x", "/dev/../etc/x",
    "/dev/a\\b", "/dev/a$", "/dev/a*",
])
def test_bad_device_refused(runner: FakeRunner, device: str) -> None:
    with pytest.raises(InvalidParameter):
        lvm.LVM(runner, devices=[device])


def test_devices_as_string_refused(runner: FakeRunner) -> None:
    with pytest.raises(InvalidParameter):
        lvm.LVM(runner, devices="/dev/loop0")


async def test_every_command_has_config_env_timeout(lv_mgr: lvm.LVM,
                                                    runner: FakeRunner) -> None:
    await lv_mgr.vgs("vgA")
    await lv_mgr.lvchange_tags("vgA", "lv9", add=["a"])
    for argv, kwargs in zip(runner.calls, runner.kwargs, strict=True):
        assert argv[2:4] == ["--config", lv_mgr.config]
        assert kwargs["env"] == {"LVM_SUPPRESS_FD_WARNINGS": "1"}
        assert kwargs["timeout"] == 30
        assert kwargs["rc_names"][5] == "command-failed"


# --- argv ----------------------------------------------------------------------------


async def test_pvcreate_argv(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.pvcreate(["/dev/loop7"], metadata_size=128 << 20, data_alignment=1 << 20)
    assert args_after_config(runner.calls[0]) == [
        "--metadatasize", "134217728b", "--dataalignment", "1048576b", "/dev/loop7"]


async def test_pvcreate_force(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.pvcreate(["/dev/loop7"], force=True)
    assert args_after_config(runner.calls[0]) == ["--yes", "--force", "/dev/loop7"]


async def test_pvcreate_refuses_device_outside_filter(lv_mgr: lvm.LVM,
                                                      runner: FakeRunner) -> None:
    with pytest.raises(InvalidParameter):
        await lv_mgr.pvcreate(["/dev/loop8"])
    assert runner.calls == []


async def test_vgcreate_argv(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.vgcreate("vgA", ["/dev/loop7", "/dev/mapper/360014051"],
                          extent_size=128 << 20, tags=["RHAT_storage_domain", "MDT_X=1"])
    assert runner.calls[0][1] == "vgcreate"
    assert args_after_config(runner.calls[0]) == [
        "--physicalextentsize", "134217728b", "--addtag", "RHAT_storage_domain",
        "--addtag", "MDT_X=1", "vgA", "/dev/loop7", "/dev/mapper/360014051"]


async def test_lvcreate_argv(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvcreate("vgA", "lv1", 1 << 30, tags=["PU_x", "IU_y"], contiguous=True)
    assert args_after_config(runner.calls[0]) == [
        "--name", "lv1", "--size", "1073741824b", "--activate", "n", "--zero", "n",
        "--contiguous", "y", "--addtag", "PU_x", "--addtag", "IU_y", "vgA"]


async def test_lvcreate_active_zeroed(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvcreate("vgA", "lv1", 512, activate=True, zero=True)
    args = args_after_config(runner.calls[0])
    assert args[4:8] == ["--activate", "y", "--zero", "y"]


@pytest.mark.parametrize("size", [0, -512, 513, 1.5, True])
async def test_lvcreate_bad_size(lv_mgr: lvm.LVM, runner: FakeRunner, size: Any) -> None:
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvcreate("vgA", "lv1", size)
    assert runner.calls == []


async def test_lv_commands_argv(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvremove("vgA", ["lv1", "lv2"])
    await lv_mgr.lvrename("vgA", "lv1", "lv3")
    await lv_mgr.lvextend("vgA", "lv3", 2 << 30)
    await lv_mgr.activate("vgA", ["lv1", "lv2"])
    await lv_mgr.deactivate("vgA", ["lv1"])
    await lv_mgr.refresh("vgA", ["lv1"])
    await lv_mgr.vgremove("vgA")
    await lv_mgr.vgck("vgA")
    await lv_mgr.pvremove(["/dev/loop7"])
    assert [(c[1], args_after_config(c)) for c in runner.calls] == [
        ("lvremove", ["--force", "vgA/lv1", "vgA/lv2"]),
        ("lvrename", ["vgA", "lv1", "lv3"]),
        ("lvextend", ["--autobackup", "n", "--noudevsync", "--size", "2147483648b", "vgA/lv3"]),
        ("lvchange", ["--activate", "y", "vgA/lv1", "vgA/lv2"]),
        ("lvchange", ["--activate", "n", "vgA/lv1"]),
        ("lvchange", ["--refresh", "--noudevsync", "vgA/lv1"]),
        ("vgremove", ["--force", "vgA"]),
        ("vgck", ["vgA"]),
        ("pvremove", ["/dev/loop7"]),
    ]


async def test_tags_changed_in_one_command(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvchange_tags("vgA", "lv1", add=["MD_1", "LEGAL"], remove=["ILLEGAL"])
    await lv_mgr.vgchange_tags("vgA", add=["MDT_B=2"], remove=["MDT_B=1"])
    assert [(c[1], args_after_config(c)) for c in runner.calls] == [
        ("lvchange", ["--deltag", "ILLEGAL", "--addtag", "MD_1", "--addtag", "LEGAL",
                      "vgA/lv1"]),
        ("vgchange", ["--deltag", "MDT_B=1", "--addtag", "MDT_B=2", "vgA"]),
    ]


async def test_tag_added_and_removed_at_once_refused(lv_mgr: lvm.LVM) -> None:
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvchange_tags("vgA", "lv1", add=["a"], remove=["a"])
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvchange_tags("vgA", "lv1")


async def test_activation_refused_when_disabled(runner: FakeRunner) -> None:
    mgr = lvm.LVM(runner, devices=["/dev/loop1"], activation=False)
    for call in (mgr.activate("vg", ["lv"]), mgr.deactivate("vg", ["lv"]),
                 mgr.refresh("vg", ["lv"]), mgr.lvcreate("vg", "lv", 512, activate=True)):
        with pytest.raises(LVMCommandError, match="activation is disabled"):
            await call
    assert runner.calls == []


# --- checks --------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["a", "MDT_X=1", "x/y", "a+b.c-d!e:f&g#h", "T" * 1024])
def test_good_tags(tag: str) -> None:
    assert lvm.check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "a,b", "a b", "a\nb", "-a", "ä", "a@b", "a\"b",
                                 "T" * 1025, "a|b"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(InvalidParameter):
        lvm.check_tag(tag)


async def test_bad_tag_never_reaches_command(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvchange_tags("vgA", "lv1", add=["ok", "not,ok"])
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvcreate("vgA", "lv1", 512, tags=["--force"])
    with pytest.raises(InvalidParameter):
        await lv_mgr.vgcreate("vgA", ["/dev/loop7"], tags="abc")
    assert runner.calls == []


@pytest.mark.parametrize("name", ["", ".", "..", "-vg", "a b", "a/b", "a\n", "x" * 128, "ä"])
async def test_bad_names(lv_mgr: lvm.LVM, runner: FakeRunner, name: str) -> None:
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvcreate("vgA", name, 512)
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvs(name)
    with pytest.raises(InvalidParameter):
        await lv_mgr.lvremove(name, ["lv"])
    assert runner.calls == []


# --- reports -------------------------------------------------------------------------


async def test_vgs_parsed(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    [vg] = await lv_mgr.vgs("vgA")
    assert vg == lvm.VG(name="vgA", uuid="jc16Hq-uDbO-vH2s-uiyf-cZrR-XdNa-tuYgwX",
                        attr="wz--n-", size=515899392, free=503316480, extent_size=4194304,
                        extent_count=123, free_count=120, tags=("MDT_A=1", "x/y"),
                        pv_count=1, lv_count=1, mda_size=17821696, mda_free=8908800)
    assert not vg.partial
    args = args_after_config(runner.calls[0])
    assert args[:4] == ["--reportformat", "json", "--units", "b"]
    assert "--nosuffix" in args
    assert args[-1] == "vgA"


async def test_pvs_parsed(lv_mgr: lvm.LVM) -> None:
    [pv] = await lv_mgr.pvs("vgA")
    assert (pv.name, pv.vg_name, pv.size, pv.free, pv.pe_start, pv.dev_size) == (
        "/dev/loop0", "vgA", 515899392, 503316480, 17825792, 536870912)
    assert pv.uuid == "ZgS3S1-FGcZ-Cmae-W36S-5QCi-jxK6-HCrPcY"
    assert pv.tags == ()
    assert await lv_mgr.pvs("other") == []


async def test_lvs_parsed(lv_mgr: lvm.LVM) -> None:
    lvs = {lv.name: lv for lv in await lv_mgr.lvs("vgA")}
    assert lvs["lv9"] == lvm.LV(name="lv9", vg_name="vgA",
                                uuid="diorBb-pizA-3jbn-0nrP-8KVy-txYg-TOuWTC", size=12582912,
                                tags=("IU_x", "T1"), attr="-wi-XX----", active=None,
                                opened=None, path="/dev/vgA/lv9")
    assert (lvs["lv2"].active, lvs["lv2"].opened) == (True, True)
    assert (lvs["lv3"].active, lvs["lv3"].opened) == (False, False)
    assert (await lv_mgr.lv("vgA", "lv2")).size == 8388608


async def test_lv_missing(lv_mgr: lvm.LVM) -> None:
    with pytest.raises(lvm.LVMNotFound):
        await lv_mgr.lv("vgA", "nosuch")


@pytest.mark.parametrize("out", [b"", b"not json", b'{"report": [{"vg": [{"vg_name": "x"}]}]}',
                                 b'{"report": {}}'])
def test_bad_report_output(out: bytes) -> None:
    with pytest.raises(LVMCommandError, match="unexpected vgs output"):
        lvm.parse_vgs(out)


# --- cache ---------------------------------------------------------------------------


async def test_report_cached(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    first = await lv_mgr.lvs("vgA")
    second = await lv_mgr.lvs("vgA")
    assert first == second
    assert runner.ops() == ["lvs"]


async def test_report_of_all_vgs_not_cached(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvs()
    await lv_mgr.lvs()
    assert runner.ops() == ["lvs", "lvs"]


async def test_cache_expires(lv_mgr: lvm.LVM, runner: FakeRunner, clock: Clock) -> None:
    await lv_mgr.vgs("vgA")
    clock.now += 9
    await lv_mgr.vgs("vgA")
    clock.now += 2
    await lv_mgr.vgs("vgA")
    assert runner.ops() == ["vgs", "vgs"]


@pytest.mark.parametrize("change", [
    lambda m: m.lvcreate("vgA", "lv1", 512),
    lambda m: m.lvremove("vgA", ["lv1"]),
    lambda m: m.lvrename("vgA", "lv1", "lv2"),
    lambda m: m.lvextend("vgA", "lv1", 1 << 30),
    lambda m: m.lvchange_tags("vgA", "lv1", add=["a"]),
    lambda m: m.vgchange_tags("vgA", remove=["a"]),
    lambda m: m.vgremove("vgA"),
], ids=["lvcreate", "lvremove", "lvrename", "lvextend", "lvtags", "vgtags", "vgremove"])
async def test_change_drops_cached_reports(lv_mgr: lvm.LVM, runner: FakeRunner,
                                           change: Any) -> None:
    await lv_mgr.lvs("vgA")
    await lv_mgr.vgs("vgA")
    await lv_mgr.pvs("vgA")
    await lv_mgr.lvs("vgB")
    await change(lv_mgr)
    runner.calls.clear()
    await lv_mgr.lvs("vgA")
    await lv_mgr.vgs("vgA")
    await lv_mgr.pvs("vgA")
    await lv_mgr.lvs("vgB")   # another VG: still cached
    assert runner.ops() == ["lvs", "vgs", "pvs"]


async def test_refresh_keeps_cached_report(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """A refresh writes no metadata and changes no LV's state: the cached
    reports stay; but not when the report could not tell a refreshed LV's
    state (lv9: "X", its mapping differed from the metadata), nor when
    the refresh failed."""
    await lv_mgr.lvs("vgA")
    await lv_mgr.vgs("vgA")
    await lv_mgr.refresh("vgA", ["lv2", "lv3"])
    runner.calls.clear()
    await lv_mgr.lvs("vgA")
    await lv_mgr.vgs("vgA")
    assert runner.ops() == []

    await lv_mgr.refresh("vgA", ["lv9"])
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvchange", "lvs"]

    runner.calls.clear()
    runner.fail["lvchange"] = (5, b"  Failed to suspend logical volume vgA/lv2.\n")
    with pytest.raises(LVMCommandError):
        await lv_mgr.refresh("vgA", ["lv2"])
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvchange", "lvs"]


async def test_report_across_refresh_not_stored(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """An lvs that ran while an LV was refreshed may show it mid-reload: it
    is not cached."""
    runner.delay = 0.05
    report = asyncio.create_task(lv_mgr.lvs("vgA"))
    await until(lambda: runner.ops() == ["lvs"], "the lvs running")
    await lv_mgr.refresh("vgA", ["lv2"])
    await report
    runner.delay = 0
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs", "lvchange", "lvs"]


async def test_activation_keeps_cached_report(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """(De)activation writes no metadata: the cached report stays, showing
    the LVs' new state; a report that ran across it is not stored."""
    await lv_mgr.lvs("vgA")
    await lv_mgr.deactivate("vgA", ["lv2"])
    await lv_mgr.activate("vgA", ["lv3"])
    runner.calls.clear()
    by_name = {lv.name: lv for lv in await lv_mgr.lvs("vgA")}
    assert runner.ops() == []
    assert (by_name["lv2"].active, by_name["lv2"].opened, by_name["lv2"].attr) == \
        (False, False, "-wi-------")
    assert (by_name["lv3"].active, by_name["lv3"].opened, by_name["lv3"].attr) == \
        (True, False, "-wi-a-----")
    assert by_name["lv9"].active is None   # not named: as reported

    lv_mgr.invalidate("vgA")
    # (the gate holds reports only)
    await assert_report_across_change_not_cached(
        lv_mgr, runner, lambda: lv_mgr.deactivate("vgA", ["lv2"]))


async def assert_report_across_change_not_cached(
        lv_mgr: lvm.LVM, runner: FakeRunner, change: Callable[[], Awaitable[None]]) -> None:
    """An lvs held running while `change` runs is returned but not cached:
    the next lvs asks LVM again."""
    runner.gate = asyncio.Event()
    report = asyncio.create_task(lv_mgr.lvs("vgA"))
    await until(lambda: runner.running.get("lvs"), "the report runs")
    assert runner.running["lvs"] == 1
    await change()
    runner.gate.set()
    await report
    runner.gate = None
    runner.calls.clear()
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs"]


class Stamps:
    """A VG's metadata stamp as a test sets it; counts its reads."""

    def __init__(self) -> None:
        self.value: bytes | None = b"s1"
        self.reads = 0

    async def __call__(self) -> bytes | None:
        self.reads += 1
        return self.value


async def test_suspect_keeps_lv_report_while_stamp_holds(lv_mgr: lvm.LVM,
                                                          runner: FakeRunner) -> None:
    """After `suspect` (the domain lease was taken) the LV report is used
    again only if the VG's metadata stamp reads as before it ran."""
    stamps = Stamps()
    lv_mgr.watch_metadata("vgA", stamps)
    await lv_mgr.lvs("vgA")
    await lv_mgr.vgs("vgA")
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")               # stamp unchanged: no lvs
    await lv_mgr.lvs("vgA")               # checked once, then trusted
    await lv_mgr.vgs("vgA")               # other reports are dropped
    assert runner.ops() == ["lvs", "vgs", "vgs"]
    assert stamps.reads == 2              # before the report; once after suspect

    stamps.value = b"s2"                  # another host changed the VG
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")               # stored with s2 before it ran
    assert runner.ops() == ["lvs", "vgs", "vgs", "lvs"]

    stamps.value = None                   # cannot tell: LVM is asked
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")
    assert runner.ops()[-1] == "lvs" and len(runner.ops()) == 5


async def test_sole_writer_lvcreate_keeps_report(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """lvcreate by the VG's sole writer adds the new LV to the cached,
    stamped report and re-stamps it; without a stamp the report goes."""
    stamps = Stamps()
    lv_mgr.watch_metadata("vgA", stamps)
    await lv_mgr.lvs("vgA")
    stamps.value = b"s2"                  # what the lvcreate commits
    await lv_mgr.lvcreate("vgA", "new", 8 << 20, tags=["T1"], activate=True,
                          sole_writer=True)
    lv_mgr.suspect("vgA")                 # the lease taken again
    by_name = {lv.name: lv for lv in await lv_mgr.lvs("vgA")}
    assert runner.ops() == ["lvs", "lvcreate"]
    assert (by_name["new"].size, by_name["new"].tags, by_name["new"].active) == \
        (8 << 20, ("T1",), True)

    await lv_mgr.lvcreate("vgA", "plain", 8 << 20)          # not sole_writer
    await lv_mgr.lvs("vgA")
    stamps.value = None
    await lv_mgr.lvcreate("vgA", "more", 8 << 20, sole_writer=True)
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs", "lvcreate", "lvcreate", "lvs", "lvcreate", "lvs"]


class Commits(Stamps):
    """A stamp that changes with each change command the runner ran (what
    LVM commits), and with `value` (another host's commit)."""

    def __init__(self, runner: FakeRunner) -> None:
        super().__init__()
        self.runner = runner

    async def __call__(self) -> bytes | None:
        self.reads += 1
        changes = sum(1 for op in self.runner.ops() if not op.endswith("s"))
        return None if self.value is None else self.value + str(changes).encode()


async def test_sole_writer_lvextend_keeps_report(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """A thin volume's extensions in a row, each under the domain lease
    (suspect): the stamp checked, one lvextend each, no lvs after the first;
    the report holds each new size. Another host's commit, or no
    sole_writer: the report goes."""
    stamps = Commits(runner)
    lv_mgr.watch_metadata("vgA", stamps)
    await lv_mgr.lvs("vgA")
    for size in (1 << 30, 2 << 30):
        lv_mgr.suspect("vgA")             # the lease taken
        await lv_mgr.lvextend("vgA", "lv9", size, sole_writer=True)
        lv_mgr.suspect("vgA")
        by_name = {lv.name: lv for lv in await lv_mgr.lvs("vgA")}
        assert by_name["lv9"].size == size
    assert runner.ops() == ["lvs", "lvextend", "lvextend"]

    lv_mgr.suspect("vgA")
    stamps.value = b"other host"          # another host changed the VG
    await lv_mgr.lvextend("vgA", "lv9", 3 << 30, sole_writer=True)
    await lv_mgr.lvs("vgA")
    await lv_mgr.lvextend("vgA", "lv9", 4 << 30)
    await lv_mgr.lvs("vgA")
    assert runner.ops()[3:] == ["lvextend", "lvs", "lvextend", "lvs"]


async def test_sole_writer_report_lives_from_its_change(lv_mgr: lvm.LVM, runner: FakeRunner,
                                                        clock: Clock) -> None:
    """A report kept across a sole writer's lvextend is as fresh as the
    change (checked under the lease): extensions closer together than the
    cache's lifetime never run lvs, however long the watch runs."""
    lv_mgr.watch_metadata("vgA", Commits(runner))
    await lv_mgr.lvs("vgA")
    for size in (1 << 30, 2 << 30, 3 << 30):
        clock.now += 8                    # cache_ttl is 10
        lv_mgr.suspect("vgA")
        await lv_mgr.lvextend("vgA", "lv9", size, sole_writer=True)
    clock.now += 8
    assert {lv.name: lv.size for lv in await lv_mgr.lvs("vgA")}["lv9"] == 3 << 30
    assert runner.ops() == ["lvs", "lvextend", "lvextend", "lvextend"]
    clock.now += 3                        # 11 s after the last change
    await lv_mgr.lvs("vgA")
    assert runner.ops()[-1] == "lvs"


async def test_sole_writer_lvcreate_right_after_the_lease(lv_mgr: lvm.LVM,
                                                          runner: FakeRunner) -> None:
    """lvcreate under a lease just taken (the report suspect): the stamp is
    checked, as for lvextend, and the report kept with the new LV; after
    another host's commit it goes."""
    stamps = Commits(runner)
    lv_mgr.watch_metadata("vgA", stamps)
    await lv_mgr.lvs("vgA")
    for name in ("new1", "new2"):
        lv_mgr.suspect("vgA")
        await lv_mgr.lvcreate("vgA", name, 8 << 20, sole_writer=True)
    lv_mgr.suspect("vgA")
    assert {"new1", "new2"} <= {lv.name for lv in await lv_mgr.lvs("vgA")}
    assert runner.ops() == ["lvs", "lvcreate", "lvcreate"]
    lv_mgr.suspect("vgA")
    stamps.value = b"other host"
    await lv_mgr.lvcreate("vgA", "new3", 8 << 20, sole_writer=True)
    await lv_mgr.lvs("vgA")
    assert runner.ops()[3:] == ["lvcreate", "lvs"]


async def test_suspect_without_stamp_drops_report(lv_mgr: lvm.LVM,
                                                  runner: FakeRunner) -> None:
    await lv_mgr.lvs("vgA")
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs", "lvs"]


async def test_stamp_failure_asks_lvm(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    reads = []

    async def failing() -> bytes | None:
        reads.append(1)
        if len(reads) > 1:
            raise OSError(5, "Input/output error")
        return b"s1"
    lv_mgr.watch_metadata("vgA", failing)
    await lv_mgr.lvs("vgA")
    lv_mgr.suspect("vgA")
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs", "lvs"]


async def test_failed_activation_drops_cached_report(lv_mgr: lvm.LVM,
                                                     runner: FakeRunner) -> None:
    await lv_mgr.lvs("vgA")
    runner.fail["lvchange"] = (5, b"  device-mapper: reload ioctl failed.\n")
    with pytest.raises(LVMCommandError):
        await lv_mgr.activate("vgA", ["lv3"])
    runner.calls.clear()
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs"]


async def test_failed_change_drops_cached_reports(lv_mgr: lvm.LVM,
                                                  runner: FakeRunner) -> None:
    await lv_mgr.lvs("vgA")
    runner.fail["lvextend"] = (5, b"  Failed to suspend logical volume vgA/lv1.\n")
    with pytest.raises(LVMCommandError):
        await lv_mgr.lvextend("vgA", "lv1", 1 << 30)
    runner.calls.clear()
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs"]


async def test_invalidate(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvs("vgA")
    await lv_mgr.lvs("vgB")
    lv_mgr.invalidate("vgA")
    await lv_mgr.lvs("vgA")
    await lv_mgr.lvs("vgB")
    lv_mgr.invalidate()
    await lv_mgr.lvs("vgA")
    await lv_mgr.lvs("vgB")
    assert runner.ops() == ["lvs", "lvs", "lvs", "lvs", "lvs"]


async def test_set_devices_drops_cache(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    await lv_mgr.lvs("vgA")
    lv_mgr.set_devices(["/dev/loop7", "/dev/loop8"])
    assert '"a|^/dev/loop8$|"' in lv_mgr.config
    await lv_mgr.lvs("vgA")
    assert runner.ops() == ["lvs", "lvs"]


async def test_report_racing_a_change_is_not_stored(lv_mgr: lvm.LVM,
                                                    runner: FakeRunner) -> None:
    """A report that started before a change and ended after it may show the
    old metadata: it is returned to its caller but never cached."""
    await assert_report_across_change_not_cached(
        lv_mgr, runner, lambda: lv_mgr.lvchange_tags("vgA", "lv1", add=["a"]))


# --- locking -------------------------------------------------------------------------


async def test_changes_to_one_vg_are_serialized(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    runner.delay = 0.02
    await asyncio.gather(*(lv_mgr.lvchange_tags("vgA", f"lv{i}", add=["a"])
                           for i in range(5)))
    assert runner.max_running["lvchange"] == 1


async def test_changes_to_different_vgs_run_in_parallel(lv_mgr: lvm.LVM,
                                                        runner: FakeRunner) -> None:
    runner.delay = 0.02
    await asyncio.gather(*(lv_mgr.lvchange_tags(f"vg{i}", "lv", add=["a"])
                           for i in range(5)))
    assert runner.max_running["lvchange"] == 5


async def test_lock_is_per_vg_and_exposed(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """A caller holding the VG lock (e.g. a multi-step domain change) keeps
    other changes of that VG out until it releases it."""
    async with lv_mgr.lock("vgA"):
        task = asyncio.create_task(lv_mgr.lvremove("vgA", ["lv1"]))
        other = asyncio.create_task(lv_mgr.lvremove("vgB", ["lv1"]))
        # `task` was made first, so it got as far as it could before `other` ended
        await other
        assert runner.ops() == ["lvremove"]
        assert args_after_config(runner.calls[0])[-1] == "vgB/lv1"
        assert not task.done()
    await task
    await other
    assert len(runner.calls) == 2


# --- errors --------------------------------------------------------------------------


async def test_error_reason_is_the_useful_line(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    runner.fail["lvrename"] = (5, ACTIVATION_WARNING +
                               b"  File descriptor 10 (/dev/null) leaked on lvm invocation.\n"
                               b'  Existing logical volume "lv1" not found in volume group '
                               b'"vgA"\n')
    with pytest.raises(lvm.LVMNotFound) as e:
        await lv_mgr.lvrename("vgA", "lv1", "lv2")
    assert e.value.code == 621
    assert e.value.fields["reason"] == (
        'lvrename: Existing logical volume "lv1" not found in volume group "vgA"')
    assert e.value.fields["rc"] == 5
    assert e.value.fields["status"] == "rc=5 command-failed"
    assert "WARNING" not in str(e.value)


async def test_vg_not_found(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    runner.fail["vgs"] = (5, ACTIVATION_WARNING + b'  Volume group "nosuch" not found\n'
                          b"  Cannot process volume group nosuch\n")
    with pytest.raises(lvm.LVMNotFound, match='Volume group "nosuch" not found'):
        await lv_mgr.vgs("nosuch")


async def test_lvcreate_error(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    runner.fail["lvcreate"] = (5, ACTIVATION_WARNING + b'  Volume group "vgA" has insufficient '
                               b"free space (0 extents): 8 required.\n")
    with pytest.raises(CannotCreateLogicalVolume) as e:
        await lv_mgr.lvcreate("vgA", "lv1", 1 << 30)
    assert e.value.code == 550
    assert e.value.fields["lvName"] == "lv1"
    assert e.value.fields["vgName"] == "vgA"
    assert "insufficient free space" in e.value.fields["reason"]


async def test_lvextend_same_size_is_not_an_error(lv_mgr: lvm.LVM,
                                                  runner: FakeRunner) -> None:
    runner.fail["lvextend"] = (5, b"  New size (3 extents) matches existing size (3 extents).\n")
    await lv_mgr.lvextend("vgA", "lv1", 12 << 20)
    runner.fail["lvextend"] = (5, b"  New size given (1 extents) not larger than existing size "
                               b"(3 extents)\n")
    with pytest.raises(LVMCommandError, match="not larger"):
        await lv_mgr.lvextend("vgA", "lv1", 4 << 20)


def test_error_reason_falls_back_to_last_line() -> None:
    assert lvm.error_reason(ACTIVATION_WARNING) == (
        "WARNING: Activation disabled. No device-mapper interaction will be attempted.")
    assert lvm.error_reason(b"") == "no error message"
    assert lvm.error_reason("x" * 1000).endswith("...")


async def test_timeout_passes_through(lv_mgr: lvm.LVM) -> None:
    async def hung(argv: Sequence[str], **kwargs: Any) -> commands.CommandResult:
        raise commands.CommandTimeout(argv, kwargs["timeout"])

    mgr = lvm.LVM(hung, devices=["/dev/loop7"], timeout=5)
    with pytest.raises(commands.CommandTimeout):
        await mgr.vgs("vgA")


def test_rc_names() -> None:
    names: Mapping[int, str] = lvm.RC_NAMES
    assert names[3] == "invalid-command-line"
    assert names[5] == "command-failed"


async def test_without_udev_sync(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """lvcreate and deactivation that do not wait for udev (issue 21)."""
    await lv_mgr.lvcreate("vgA", "lv1", 8 << 20, activate=True, udev_sync=False)
    await lv_mgr.deactivate("vgA", ["lv1"], udev_sync=False)
    await lv_mgr.deactivate("vgA", ["lv1"])
    assert ["--noudevsync" in args_after_config(c) for c in runner.calls] == [True, True, False]
    assert lvm.dm_name("a-b", "c-d-e") == "a--b-c--d--e"


async def test_extension_and_reload_start_urgent(lv_mgr: lvm.LVM, runner: FakeRunner) -> None:
    """What a VM may wait on (a thin volume's lvextend, an LV's reload)
    starts at the higher priority (commands.run urgent); nothing else."""
    await lv_mgr.lvs("vgA")
    await lv_mgr.lvextend("vgA", "lv9", 2 << 30)
    await lv_mgr.refresh("vgA", ["lv9"])
    await lv_mgr.lvcreate("vgA", "new1", 8 << 20)
    await lv_mgr.activate("vgA", ["new1"])
    assert [(op, kw["urgent"]) for op, kw in zip(runner.ops(), runner.kwargs, strict=True)] == \
        [("lvs", False), ("lvextend", True), ("lvchange", True), ("lvcreate", False),
         ("lvchange", False)]


async def test_what_goes_to_a_running_lvm_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the agent's own runner, what a VM waits on (an extension, a
    refresh; the activation and deactivation of its chain at prepareImage
    and teardownImage) and a create that does not zero go to a running lvm
    shell (storage.lvmshell: no lvm start each time); reports and what
    may ask a question are spawned."""
    spawned, shelled = FakeRunner(), FakeRunner()
    monkeypatch.setattr(lvm.lvmshell, "run", shelled)
    mgr = lvm.LVM(devices=["/dev/loop7"], timeout=30)
    mgr._runner = spawned
    await mgr.activate("vgA", ["lv1", "lv2"])
    await mgr.deactivate("vgA", ["lv1"])
    await mgr.deactivate("vgA", ["lv2"], udev_sync=False)
    await mgr.lvextend("vgA", "lv1", 2 << 30)
    await mgr.refresh("vgA", ["lv1"])
    await mgr.lvcreate("vgA", "lv3", 1 << 30)
    await mgr.lvcreate("vgA", "lv4", 1 << 30, zero=True)
    await mgr.lvs("vgA")
    assert [(c[1], args_after_config(c)[-1]) for c in shelled.calls] == [
        ("lvchange", "vgA/lv2"), ("lvchange", "vgA/lv1"), ("lvchange", "vgA/lv2"),
        ("lvextend", "vgA/lv1"), ("lvchange", "vgA/lv1"), ("lvcreate", "vgA")]
    assert [c[1] for c in spawned.calls] == ["lvcreate", "lvs"]
