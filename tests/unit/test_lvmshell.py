"""storage.lvmshell against a fake `lvm` shell (the protocol of lvm2's
shell with LVM_REPORT_FD): a command's return code from its log report,
a failure's messages from `lastlog`, a hung command killing the shell and
the next command starting a new one, a shell that dies answered as a
failed command; and how command lines are quoted."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from storage import commands, lvmshell

FAKE = '''#!{python}
import json, os, sys, time
fd = int(os.environ["LVM_REPORT_FD"])
assert os.environ["LVM_COMMAND_PROFILE"] == "testprofile"
def report(code, context="shell", **extra):
    os.write(fd, json.dumps({{"log": [dict(log_type="status", log_context=context,
                                          log_ret_code=str(code), **extra)]}}).encode() + b"\\n")
last = []
for line in sys.stdin:
    words = line.split()
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(line)
    sys.stdout.write("lvm> ")
    sys.stdout.flush()
    if words[0] == "hang":
        time.sleep(3600)
    elif words[0] == "die":
        sys.exit(3)
    elif words[0] == "fail":
        sys.stderr.write("  what went wrong\\n")
        sys.stderr.flush()
        last = [{{"log_type": "error", "log_message": "Volume group nosuch not found"}}]
        report(5)
    elif words[0] == "lastlog":
        os.write(fd, json.dumps({{"log": last}}).encode() + b"\\n")
    else:
        last = []
        report(1)
'''


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> lvmshell.Shell:
    tool = tmp_path / "lvm"
    tool.write_text(FAKE.format(python=sys.executable))
    tool.chmod(0o755)
    (tmp_path / "testprofile.profile").write_text("")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "lines"))
    return lvmshell.Shell(str(tool), profile="testprofile", profile_dir=str(tmp_path))


def lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "lines").read_text().splitlines()


async def test_commands_run_in_one_shell(shell: lvmshell.Shell, tmp_path: Path) -> None:
    assert shell.usable
    try:
        r = await shell.run(["lvm", "lvextend", "--config", 'devices { filter=["a|x|"] }', "vg/lv"],
                            timeout=10)
        pid = shell.pid
        r2 = await shell.run(["lvm", "lvchange", "--refresh", "vg/lv"], timeout=10)
        assert r.rc == 0 and r2.rc == 0 and shell.pid == pid
        assert lines(tmp_path) == ["lvextend --config 'devices { filter=[\"a|x|\"] }' vg/lv",
                                   "lvchange --refresh vg/lv"]
    finally:
        await shell.close()
    assert shell.pid is None


async def test_a_failure_says_what_lastlog_says(shell: lvmshell.Shell, tmp_path: Path) -> None:
    try:
        with pytest.raises(commands.CommandError) as e:
            await shell.run(["lvm", "fail", "nosuch"], timeout=10, rc_names={5: "failed"})
        assert e.value.rc == 5 and e.value.rc_name == "failed"
        assert "Volume group nosuch not found" in e.value.err_text
        # the shell goes on
        pid = shell.pid
        assert (await shell.run(["lvm", "lvs"], timeout=10)).rc == 0 and shell.pid == pid
    finally:
        await shell.close()


async def test_a_hung_command_kills_the_shell(shell: lvmshell.Shell) -> None:
    try:
        await shell.run(["lvm", "lvs"], timeout=10)
        pid = shell.pid
        assert pid is not None
        with pytest.raises(commands.CommandTimeout):
            await shell.run(["lvm", "hang"], timeout=0.5)
        assert shell.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert (await shell.run(["lvm", "lvs"], timeout=10)).rc == 0
        assert shell.pid not in (None, pid)
    finally:
        await shell.close()


async def test_a_shell_that_ends_fails_the_command_and_is_replaced(
        shell: lvmshell.Shell) -> None:
    try:
        with pytest.raises(commands.CommandError) as e:
            await shell.run(["lvm", "die"], timeout=10)
        assert e.value.rc == -1 and "lvm shell" in e.value.err_text
        assert (await shell.run(["lvm", "lvs"], timeout=10)).rc == 0
        # killed between commands: the next one starts another
        pid = shell.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while shell._child is not None and shell._child.returncode is None:
            await shell._child.wait()
        assert (await shell.run(["lvm", "lvs"], timeout=10)).rc == 0
        assert shell.pid != pid
    finally:
        await shell.close()


def test_command_lines() -> None:
    say = lvmshell.command_line
    assert say(["lvextend", "-L", "8m", "vg/lv"]) == "lvextend -L 8m vg/lv"
    assert say(["--config", 'a { b="c d" }']) == "--config 'a { b=\"c d\" }'"
    assert say(["x y's"]) == '"x y\'s"'
    assert say(["#tag", "'q"]) == "'#tag' \"'q\""
    for bad in (["a 'b\" c"], [""], ["a\nb"]):
        with pytest.raises(lvmshell.CannotSay):
            say(bad)
    with pytest.raises(lvmshell.CannotSay):
        say(["x"] * lvmshell.MAX_ARGS)


async def test_run_spawns_when_off_busy_or_given_more(
        shell: lvmshell.Shell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's runner: in the shell of the command's priority when the
    shell is on and free, else spawned (commands.run)."""
    ran: list[str] = []

    async def spawned(argv: list[str], **kw: object) -> commands.CommandResult:
        ran.append(argv[1])
        return commands.CommandResult(tuple(argv), 0, b"", b"")
    monkeypatch.setattr(commands, "run", spawned)
    monkeypatch.setitem(lvmshell._SHELLS, True, shell)
    try:
        monkeypatch.setattr(lvmshell, "ENABLED", False)
        await lvmshell.run(["lvm", "off"], timeout=5, urgent=True)
        monkeypatch.setattr(lvmshell, "ENABLED", True)
        async with shell.lock:
            await lvmshell.run(["lvm", "busy"], timeout=5, urgent=True)
        await lvmshell.run(["lvm", "input"], timeout=5, urgent=True, input=b"y")
        await lvmshell.run(["lvm", "inshell"], timeout=5, urgent=True)
        assert ran == ["off", "busy", "input"]
        assert lines(tmp_path) == ["inshell"]
    finally:
        await shell.close()
