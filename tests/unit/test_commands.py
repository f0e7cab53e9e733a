"""storage.commands: the shared runner, on real tiny programs (no root)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from storage import commands
from storage.commands import (
    CommandError,
    CommandNotFound,
    CommandOutputTooLarge,
    CommandResult,
    CommandTimeout,
    Runner,
    check_arg,
    run,
    run_with_progress,
)
from storage.errors import GeneralException, InvalidParameter, ResourceTimeout
from tests.polling import until

PY = sys.executable


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGTERM -> SIGKILL grace; 2 s in production, short here to keep tests fast.
    monkeypatch.setattr(commands, "KILL_GRACE", 0.3)


def is_dead(pid: int) -> bool:
    """Gone, or a zombie: an orphaned grandchild is reaped by pid 1, not by us,
    and some container inits never reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_dead(*pids: int, within: float = 3.0) -> None:
    await until(lambda: all(is_dead(p) for p in pids), f"processes {list(pids)} dead",
                timeout=within)


class PidCollector:
    """Line callback collecting the pids a shell script prints."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pids: list[int] = []
        self.ready = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.pids.append(int(line))
        if len(self.pids) == self.count:
            self.ready.set()


# A shell with a background child; prints the child's pid, then its own.
TWO_SLEEPERS = "sleep 100 & echo $!; echo $$; sleep 100"


async def test_success() -> None:
    result = await run(["sh", "-c", "echo hello; echo world; echo oops >&2"], timeout=10)
    assert result.rc == 0
    assert result.out == b"hello\nworld\n"
    assert result.err == b"oops\n"
    assert result.argv == ("sh", "-c", "echo hello; echo world; echo oops >&2")
    assert result.text == "hello\nworld\n"
    assert result.err_text == "oops\n"
    assert result.lines() == ["hello", "world"]
    assert result.duration > 0


async def test_check_false_returns_failure() -> None:
    result = await run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, check=False)
    assert (result.rc, result.out, result.err) == (3, b"out\n", b"err\n")


async def test_ok_rcs() -> None:
    # e.g. qemu-img compare: 1 means "different", not a failure.
    result = await run(["sh", "-c", "exit 1"], timeout=10, ok_rcs=(0, 1))
    assert result.rc == 1


async def test_command_error_fields() -> None:
    script = "echo partial; for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 5"
    with pytest.raises(CommandError) as info:
        await run(["sh", "-c", script], timeout=10, rc_names={5: "no-such-vg"})
    e = info.value
    assert isinstance(e, GeneralException)
    assert e.code == 100
    assert e.argv == ("sh", "-c", script)
    assert e.rc == 5
    assert e.rc_name == "no-such-vg"
    assert e.out == b"partial\n"
    assert e.err.startswith(b"line1\n")
    message = str(e)
    assert message.startswith("Command sh -c ")
    assert "rc=5 no-such-vg" in message
    # The last lines of stderr, not all of it.
    assert "line7" in message and "line3" in message
    assert "line2" not in message
    assert e.fields["rc"] == 5


async def test_command_error_without_name_or_stderr() -> None:
    with pytest.raises(CommandError) as info:
        await run(["false"], timeout=10, rc_names={5: "other"})
    assert info.value.rc == 1
    assert info.value.rc_name is None
    assert str(info.value) == "Command false failed (rc=1): no output"


async def test_command_error_falls_back_to_stdout() -> None:
    with pytest.raises(CommandError) as info:
        await run(["sh", "-c", "echo iscsiadm: No records found; exit 21"], timeout=10)
    assert str(info.value).endswith("(rc=21): iscsiadm: No records found")


async def test_killed_by_signal() -> None:
    with pytest.raises(CommandError) as info:
        await run(["sh", "-c", "kill -9 $$"], timeout=10)
    assert info.value.rc == -9
    assert "killed by SIGKILL" in str(info.value)


async def test_not_found() -> None:
    with pytest.raises(CommandNotFound) as info:
        await run(["/nonexistent/tool", "arg"], timeout=10, check=False)
    assert info.value.rc == 127
    assert "/nonexistent/tool" in str(info.value)


async def test_argv_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        await run("echo hello", timeout=10)
    with pytest.raises(ValueError, match="empty"):
        await run([], timeout=10)


async def test_timeout_kills_process_group() -> None:
    pids = PidCollector(2)
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        await run(["sh", "-c", TWO_SLEEPERS], timeout=0.5, on_stdout_line=pids)
    elapsed = time.monotonic() - start
    assert elapsed < 0.5 + commands.KILL_GRACE + 1
    e = info.value
    assert isinstance(e, ResourceTimeout)
    assert e.code == 851
    assert e.timeout == 0.5
    assert e.argv == ("sh", "-c", TWO_SLEEPERS)
    assert "within 0.5 s" in str(e)
    child, shell = pids.pids[0], pids.pids[1]
    # The shell is our child: reaped, not a zombie.
    assert not Path(f"/proc/{shell}").exists()
    await wait_dead(child)


async def test_timeout_escalates_to_sigkill() -> None:
    # Both the shell and its child ignore SIGTERM (ignored signals survive exec).
    script = "trap '' TERM; sleep 100 & echo $!; echo $$; while :; do sleep 0.05; done"
    pids = PidCollector(2)
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        await run(["sh", "-c", script], timeout=0.3, on_stdout_line=pids)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.3 + commands.KILL_GRACE
    assert not Path(f"/proc/{pids.pids[1]}").exists()
    await wait_dead(pids.pids[0])


async def test_cancel_kills_process_group() -> None:
    pids = PidCollector(2)
    task = asyncio.create_task(run(["sh", "-c", TWO_SLEEPERS], timeout=60,
                                   on_stdout_line=pids))
    await asyncio.wait_for(pids.ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not Path(f"/proc/{pids.pids[1]}").exists()
    await wait_dead(pids.pids[0])


async def test_input() -> None:
    data = b"line one\n" + bytes(range(256)) * 4096  # 1 MiB: more than a pipe buffer
    result = await run(["cat"], timeout=10, input=data)
    assert result.out == data


async def test_timeout_while_writing_input() -> None:
    # The pipe fills up and the writer blocks: the timeout still holds.
    with pytest.raises(CommandTimeout):
        await run(["sleep", "100"], timeout=0.3, input=b"x" * (4 * 1024 * 1024))


async def test_input_not_read() -> None:
    # The tool exits without reading stdin: not an error of ours.
    result = await run(["true"], timeout=10, input=b"x" * (4 * 1024 * 1024))
    assert result.rc == 0


async def test_stdin_is_dev_null() -> None:
    result = await run(["readlink", "/proc/self/fd/0"], timeout=10)
    assert result.text.strip() == "/dev/null"
    # cat would wait forever on an inherited terminal or pipe.
    assert (await run(["cat"], timeout=10)).out == b""


async def test_environment() -> None:
    result = await run(["sh", "-c", 'echo "$LC_ALL $FOO"'], timeout=10,
                       env={"LC_ALL": "de_DE.UTF-8", "FOO": "bar"})
    assert result.text == "C bar\n"
    result = await run(["sh", "-c", 'echo "$LC_ALL"'], timeout=10)
    assert result.text == "C\n"


async def test_cwd(tmp_path: Path) -> None:
    result = await run(["pwd"], timeout=10, cwd=tmp_path)
    assert result.text.strip() == str(tmp_path)


async def test_own_process_group() -> None:
    result = await run([PY, "-c", "import os; print(os.getpgid(0) == os.getpid())"],
                       timeout=10)
    assert result.text == "True\n"


async def test_output_limit() -> None:
    code = "import sys; sys.stdout.write('x' * 200000)"
    with pytest.raises(CommandOutputTooLarge) as info:
        await run([PY, "-c", code], timeout=10, output_limit=100000)
    e = info.value
    assert isinstance(e, CommandError)
    assert e.stream == "stdout"
    assert e.limit == 100000
    assert len(e.out) == 100000
    assert "more than 100000 bytes on stdout" in str(e)


async def test_output_limit_runaway() -> None:
    pids = PidCollector(1)
    start = time.monotonic()
    with pytest.raises(CommandOutputTooLarge) as info:
        await run(["sh", "-c", "echo $$ >&2; yes"], timeout=30, output_limit=1024 * 1024,
                  on_stderr_line=pids)
    assert time.monotonic() - start < 5
    assert len(info.value.out) == 1024 * 1024
    assert not Path(f"/proc/{pids.pids[0]}").exists()


async def test_output_limit_stderr() -> None:
    code = "import sys; sys.stderr.write('e' * 5000)"
    with pytest.raises(CommandOutputTooLarge) as info:
        await run([PY, "-c", code], timeout=10, output_limit=4096)
    assert info.value.stream == "stderr"


async def test_output_at_limit_is_fine() -> None:
    code = "import sys; sys.stdout.write('x' * 4096)"
    result = await run([PY, "-c", code], timeout=10, output_limit=4096)
    assert len(result.out) == 4096


async def test_redaction(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="storage.commands")
    script = 'echo "login failed for password $1" >&2; echo "out $1"; exit 24'
    argv = ["sh", "-c", script, "sh", "node.session.auth.password=s3cret"]
    with pytest.raises(CommandError) as info:
        await run(argv, timeout=10, redact=["s3cret", ""])
    e = info.value
    assert "s3cret" not in str(e)
    assert "s3cret" not in repr(e.fields)
    assert "password=****" in str(e)
    assert e.argv[-1] == "node.session.auth.password=****"
    assert b"s3cret" not in e.out + e.err
    assert e.err == b"login failed for password node.session.auth.password=****\n"
    assert caplog.records
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


async def test_redaction_timeout() -> None:
    with pytest.raises(CommandTimeout) as info:
        await run(["sh", "-c", "sleep 10", "s3cret"], timeout=0.2, redact=["s3cret"],
                  check=False)
    assert "s3cret" not in str(info.value)
    assert info.value.argv == ("sh", "-c", "sleep 10", "****")


async def test_redaction_result_argv() -> None:
    result = await run(["echo", "s3cret"], timeout=10, redact=["s3cret"])
    assert result.argv == ("echo", "****")
    assert result.out == b"s3cret\n"  # the caller's own data stays raw


async def test_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="storage.commands")
    await run(["sh", "-c", "exit 2"], timeout=10, check=False)
    started, ended = [r for r in caplog.records if r.name == "storage.commands"]
    assert started.levelno == ended.levelno == logging.DEBUG
    assert started.getMessage().startswith("sh -c 'exit 2': started, pid ")
    assert re.fullmatch(r"sh -c 'exit 2': rc=2 in \d+\.\d{3} s", ended.getMessage())


QEMU_LIKE = r"printf '    (0.00/100%%)\r    (10.00/100%%)\r    (55.50/100%%)\r    (100.00/100%%)\n'"


async def test_progress() -> None:
    seen: list[float] = []
    result = await run_with_progress(["sh", "-c", QEMU_LIKE], timeout=10,
                                     progress=seen.append)
    assert seen == [0.0, 10.0, 55.5, 100.0]
    assert result.rc == 0


async def test_progress_split_writes() -> None:
    # A progress record cut between two reads is put back together.
    code = ("import sys, time\n"
            "for part in ['    (12.', '50/100%)\\r', '    (99', '.00/100%)\\r\\n']:\n"
            "    sys.stdout.write(part); sys.stdout.flush(); time.sleep(0.05)\n")
    seen: list[float] = []
    await run_with_progress([PY, "-c", code], timeout=10, progress=seen.append)
    assert seen == [12.5, 99.0]


async def test_line_callbacks_both_streams() -> None:
    out: list[str] = []
    err: list[str] = []
    await run(["sh", "-c", "printf 'a\\nb\\r\\nc'; printf 'x\\n' >&2"], timeout=10,
              on_stdout_line=out.append, on_stderr_line=err.append)
    assert out == ["a", "b", "c"]
    assert err == ["x"]


async def test_callback_error_kills_command() -> None:
    pids = PidCollector(2)

    def on_line(line: str) -> None:
        pids(line)
        if pids.ready.is_set():
            raise RuntimeError("progress sink broke")

    with pytest.raises(RuntimeError, match="progress sink broke"):
        await run(["sh", "-c", TWO_SLEEPERS], timeout=60, on_stdout_line=on_line)
    assert not Path(f"/proc/{pids.pids[1]}").exists()
    await wait_dead(pids.pids[0])


async def test_fake_runner_is_a_runner() -> None:
    # The test seam: a wrapper takes `runner`; tests pass a fake.
    calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    async def fake(argv: Any, **kwargs: Any) -> CommandResult:
        calls.append((tuple(argv), kwargs))
        kwargs["on_stdout_line"]("    (42.00/100%)")
        return CommandResult(tuple(argv), 0, b"", b"")

    runner: Runner = fake
    seen: list[float] = []
    result = await run_with_progress(["qemu-img", "convert", "-p", "a", "b"], timeout=5,
                                     progress=seen.append, runner=runner, check=False)
    assert result.rc == 0
    assert seen == [42.0]
    assert calls[0][0] == ("qemu-img", "convert", "-p", "a", "b")
    assert calls[0][1]["timeout"] == 5
    assert calls[0][1]["check"] is False


@pytest.mark.parametrize("value", ["-x", "--force", "a\nb", "a\rb", "a\x00b", ""])
def test_check_arg_rejects(value: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        check_arg(value, "path")
    assert info.value.code == 1000
    assert info.value.fields["field"] == "path"
    assert str(info.value).startswith("Invalid parameter path: ")


def test_check_arg_rejects_non_string() -> None:
    with pytest.raises(InvalidParameter):
        check_arg(5, "lun")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [
    "/rhev/data-center/mnt/server:_export",
    "iqn.2024-01.org.example:target-1",
    "rw,noatime,context=\"system_u:object_r:nfs_t:s0\"",
    "a-b",
    "file with spaces",
])
def test_check_arg_accepts(value: str) -> None:
    assert check_arg(value, "path") == value


def _nice(stat: bytes) -> int:
    """The nice value in /proc/<pid>/stat (field 19; fields after "(comm)")."""
    return int(stat.rsplit(b")", 1)[1].split()[16])


async def test_urgent_commands_start_at_a_higher_priority() -> None:
    """An urgent command starts from a spawner thread of a higher priority
    (Linux: a nice value per thread, inherited by the child); the agent's
    own threads keep theirs. Without CAP_SYS_NICE it runs at the agent's."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    plain = await run(["cat", "/proc/self/stat"], timeout=10)
    urgent = await run(["cat", "/proc/self/stat"], timeout=10, urgent=True)
    assert _nice(plain.out) == own
    want = min(commands.URGENT_NICE, own) if os.geteuid() == 0 else own
    assert _nice(urgent.out) == want
    assert os.getpriority(os.PRIO_PROCESS, 0) == own
