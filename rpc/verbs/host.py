"""Host verbs: ping, getCapabilities, getStats."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.table import TABLE


@TABLE.verb("ping", "Check that the agent answers.", result={"type": "object"})
async def ping(agent: Agent) -> dict[str, Any]:
    return {}


@TABLE.verb("getCapabilities", "Agent version, API version, supported domain types, "
            "features and this host's persistent id.",
            result={"type": "object", "required": ["version", "apiVersion", "domTypes",
                                                   "features", "hostId"]})
async def get_capabilities(agent: Agent) -> dict[str, Any]:
    return agent.host.capabilities(features=["jobs", "websocket-events", "openrpc"])


@TABLE.verb("getStats", "Host CPU and memory, agent resources, job counts by state, "
            "each known domain's state and space as of its last monitoring check.",
            result={"type": "object"})
async def get_stats(agent: Agent) -> dict[str, Any]:
    stats = agent.host.stats()
    stats["jobs"] = agent.jobs.counts()
    stats["domains"] = agent.domains.summary()
    stats["leases"] = agent.leases.held()
    stats["eventSubscribers"] = agent.events.subscribers
    return stats
