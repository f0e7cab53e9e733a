"""Verbs that test the agent itself; served only with debug.test_verbs."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from agent.jobs import JobContext
from rpc.schema import Field, Int, Number, Str
from rpc.table import TABLE
from rpc.verbs.common import JOB_RESULT, JOB_UUID
from storage import commands
from storage.errors import GeneralException


@TABLE.verb("testStepJob", "A job of `steps` steps, each a child process sleeping "
            "`stepSeconds`; fails at step `failAt` when given.",
            [JOB_UUID, Field("steps", Int(1, 1000), required=False, default=5),
             Field("stepSeconds", Number(0, 60), required=False, default=0.5),
             Field("failAt", Int(1, 1000), required=False)],
            result=JOB_RESULT, job=True, test_only=True)
async def test_step_job(agent: Agent, jobUUID: str, steps: int,
                        stepSeconds: float, failAt: int | None) -> dict[str, Any]:
    async def work(ctx: JobContext) -> dict[str, Any]:
        for step in range(1, steps + 1):
            if failAt == step:
                raise GeneralException(reason=f"failed at step {step} as asked")
            await commands.run(["sleep", str(stepSeconds)], timeout=stepSeconds + 30)
            ctx.progress(100 * step / steps)
        return {"steps": steps}

    job = await agent.jobs.submit_recorded(
        jobUUID, "testStepJob", work,
        description=f"{steps} test steps",
        params={"steps": steps, "stepSeconds": stepSeconds})
    return {"jobUUID": job.job_uuid}


@TABLE.verb("testRaise", "Raise an unexpected exception with `message` (must not leak).",
            [Field("message", Str(max_len=1000))], test_only=True)
async def test_raise(agent: Agent, message: str) -> None:
    raise RuntimeError(message)
