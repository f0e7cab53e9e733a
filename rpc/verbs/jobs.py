"""Job verbs: getJobs, abortJob, clearJob."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.schema import UUID, Field, List
from rpc.table import TABLE
from rpc.verbs.common import JOB_UUID


@TABLE.verb("getJobs", "Jobs by id: status, progress, error, times. All jobs when jobUUIDs "
            "is omitted; unknown ids are left out.",
            [Field("jobUUIDs", List(UUID(), max_items=10000), required=False)],
            result={"type": "object", "additionalProperties": {"type": "object"}})
async def get_jobs(agent: Agent, jobUUIDs: list[str] | None) -> dict[str, Any]:
    return agent.jobs.info(jobUUIDs)


@TABLE.verb("abortJob", "Abort a pending or running job and wait until its work has cleaned "
            "up; returns the job. An ended job is returned unchanged.", [JOB_UUID],
            result={"type": "object"})
async def abort_job(agent: Agent, jobUUID: str) -> dict[str, Any]:
    job = await agent.jobs.abort(jobUUID)
    return job.info()


@TABLE.verb("clearJob", "Forget an ended job.", [JOB_UUID], result={"type": "object"})
async def clear_job(agent: Agent, jobUUID: str) -> dict[str, Any]:
    agent.jobs.clear(jobUUID)
    return {}
