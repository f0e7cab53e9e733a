"""pytest fixtures running the real agent as a subprocess (every tier)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """make(state_dir=None, test_verbs=True, **kw) -> a started AgentProcess.
    Every agent made is stopped at teardown (SIGTERM, SIGKILL if it hangs)."""
    made: list[AgentProcess] = []

    def make(state_dir: Path | None = None, *, test_verbs: bool = True,
             extra_args: tuple[str, ...] = (), start: bool = True,
             **kw: Any) -> AgentProcess:
        args = [*extra_args, *(["--enable-test-verbs"] if test_verbs else [])]
        proc = AgentProcess(state_dir or tmp_path / f"agent{len(made)}", extra_args=args, **kw)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(timeout=10)
        else:
            proc.kill()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    return agent_factory()


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[Any]:
    async with agent.client() as c:
        yield c
