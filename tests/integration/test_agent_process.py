"""The real daemon as a subprocess, over mutual TLS: transport, protocol,
errors, jobs, notifications, lifecycle."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
import pytest

from agent.pki import write_pki
from rpc.client import Client, RpcError, client_ssl_context, verifying_context
from tests.agentproc import ROOT, AgentProcess
from tests.polling import until, until_async

# Every verb of API.md implemented so far (the contract's names, unchanged).
API_VERBS_SO_FAR = {
    "ping", "getCapabilities", "getStats", "getJobs", "abortJob", "clearJob",
    "connectStorageServer", "disconnectStorageServer", "getStorageConnections",
    "updateStorageConnection", "testStorageConnection", "discoverSendTargets",
    "getDeviceList", "createStorageDomain", "getStorageDomainInfo", "getStorageDomainStats",
    "getStorageDomainsList", "activateStorageDomain", "deactivateStorageDomain",
    "setStorageDomainBackup", "formatStorageDomain", "createVolume", "getVolumeInfo",
    "getVolumesList", "getImagesList", "extendVolumeSize", "deleteVolume", "deleteImage",
    "prepareImage", "teardownImage", "uploadOvfTar", "getOvfStoreInfo", "listOvfEntities",
    "copyImage", "moveImage", "snapshotImages", "createHibernationVolumes", "backupVolume",
}
# issue 17 (API.md "Additions (v1.1)")
API_VERBS_SO_FAR |= {"updateVolume", "measureVolume", "mergeSnapshots"}
API_VERBS_SO_FAR |= {"extendStorageDomain", "resizePV"}


def new_id() -> str:
    return str(uuid.uuid4())


# ---- mutual TLS -------------------------------------------------------------

async def test_right_certificate_gets_ping(client):
    assert await client.call("ping") == {}


async def _try_ping(agent: AgentProcess, ctx: ssl.SSLContext) -> None:
    async with Client(agent.url, ctx, timeout=10) as c:
        await c.call("ping")


async def test_client_without_certificate_is_refused(agent):
    ctx = verifying_context(agent.pki / "ca.pem")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)) as e:
        await _try_ping(agent, ctx)
    assert "CERTIFICATE_REQUIRED" in str(e.value).upper() or \
        isinstance(e.value, aiohttp.ClientConnectionError)


async def test_client_from_another_ca_is_refused(agent, tmp_path):
    other = tmp_path / "other-pki"
    other.mkdir()
    write_pki(other, "some other CA")
    # trusts the agent's server certificate, presents a foreign client one
    ctx = client_ssl_context(agent.pki / "ca.pem", other / "client.pem", other / "client.key")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)) as e:
        await _try_ping(agent, ctx)
    assert "UNKNOWN_CA" in str(e.value).upper() or \
        isinstance(e.value, aiohttp.ClientConnectionError)


async def test_plain_http_client_is_refused(agent):
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.post(f"http://127.0.0.1:{agent.port}/jsonrpc", data="{}") as r:
                await r.read()


async def test_health_and_metrics_behind_mtls(client):
    status, body = await client.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    await client.call("ping")
    status, body = await client.get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'hostagent_rpc_calls_total{outcome="ok",verb="ping"}' in text
    assert "hostagent_rpc_latency_seconds_bucket" in text
    assert "hostagent_event_loop_lag_seconds" in text
    assert 'hostagent_jobs{state="running"}' in text


# ---- JSON-RPC protocol and errors ---------------------------------------------

async def test_batch_of_three(client):
    results = await client.batch([("ping", {}), ("getCapabilities", {}),
                                  ("getJobs", {"jobUUIDs": []})])
    assert results[0] == {}
    assert results[1]["apiVersion"] == 1 and "nfs" in results[1]["domTypes"]
    assert results[2] == {}


async def test_parse_error(client):
    status, r = await client.post_raw("{this is not json")
    assert status == 200 and r["error"]["code"] == -32700 and r["id"] is None


async def test_unknown_method(client):
    with pytest.raises(RpcError) as e:
        await client.call("noSuchVerb")
    assert e.value.code == -32601


@pytest.mark.parametrize("params, field, reason", [
    ({"jobUUIDs": "not-a-list"}, "jobUUIDs", "expected array"),
    ({"jobUUIDs": ["ABC"]}, "jobUUIDs[0]", "UUID"),
])
async def test_get_jobs_bad_params(client, params, field, reason):
    with pytest.raises(RpcError) as e:
        await client.call("getJobs", **params)
    assert e.value.code == -32602
    assert e.value.data["field"] == field and reason in e.value.data["reason"]


async def test_wrong_type_missing_field_malformed_uuid(client):
    cases = [
        ({"jobUUID": new_id(), "steps": "five"}, "steps", "expected integer"),
        ({"steps": 2}, "jobUUID", "missing"),
        ({"jobUUID": "1234"}, "jobUUID", "UUID"),
    ]
    for params, field, reason in cases:
        with pytest.raises(RpcError) as e:
            await client.call("testStepJob", **params)
        assert e.value.code == -32602, params
        assert e.value.data["field"] == field and reason in e.value.data["reason"]
        assert field in e.value.message


async def test_unexpected_exception_gives_100_without_leak(agent, client):
    with pytest.raises(RpcError) as e:
        await client.call("testRaise", message="s3cret-internal-detail")
    assert e.value.code == 100
    assert "s3cret" not in json.dumps(e.value.to_dict())
    rid = e.value.data["requestId"]
    # the traceback is in the agent's log, with the request id
    await until(lambda: "s3cret-internal-detail" in agent.log(),
                "the traceback is in the agent's log")
    log = agent.log()
    assert f"req={rid}" in log and "Traceback" in log and "s3cret-internal-detail" in log


async def test_request_body_limit(client):
    body = b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "x": "' + b"a" * (5 << 20) + b'"}'
    status, _ = await client.post_raw(io.BytesIO(body))
    assert status == 413


async def test_discover_lists_every_verb_with_params(client):
    doc = await client.call("rpc.discover")
    methods = {m["name"]: m for m in doc["methods"]}
    assert API_VERBS_SO_FAR <= set(methods)
    params = {p["name"]: p for p in methods["getJobs"]["params"]}
    assert params["jobUUIDs"]["schema"]["type"] == "array"
    assert not params["jobUUIDs"]["required"]
    assert methods["abortJob"]["params"][0]["schema"]["format"] == "uuid"


async def test_test_verbs_absent_by_default(agent_factory):
    agent = agent_factory(test_verbs=False)
    async with agent.client() as c:
        doc = await c.call("rpc.discover")
        assert "testRaise" not in {m["name"] for m in doc["methods"]}
        with pytest.raises(RpcError) as e:
            await c.call("testRaise", message="x")
        assert e.value.code == -32601


# ---- jobs ---------------------------------------------------------------------

def _sleep_children(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "sleep"]
    except psutil.NoSuchProcess:
        return []


async def test_job_progress_notifications_on_websocket(client):
    jid = new_id()
    seen = []
    async with client.notifications() as q:
        await client.ws_call("testStepJob", jobUUID=jid, steps=4, stepSeconds=0.3)
        async with asyncio.timeout(20):
            while True:
                note = await q.get()
                if note["method"] == "job.status" and note["params"]["jobUUID"] == jid:
                    seen.append(note["params"])
                    if note["params"]["status"] in ("done", "failed", "aborted"):
                        break
    statuses = [s["status"] for s in seen]
    assert statuses[0] == "pending" and statuses[-1] == "done"
    progress = [s["progress"] for s in seen if s["status"] == "running"]
    assert len(progress) >= 2 and progress == sorted(progress)
    assert seen[-1]["progress"] == 100


async def test_abort_ends_job_and_kills_child(agent, client):
    jid = new_id()
    await client.call("testStepJob", jobUUID=jid, steps=3, stepSeconds=30)
    await until(lambda: _sleep_children(agent.proc.pid), "the job's child runs", timeout=10)
    children = _sleep_children(agent.proc.pid)
    info = await client.call("abortJob", jobUUID=jid)
    assert info["status"] == "aborted"
    assert info["error"]["data"]["name"] == "ActionStopped"
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, "the job's child process survived the abort"
    jobs = await client.call("getJobs", jobUUIDs=[jid])
    assert jobs[jid]["status"] == "aborted"


async def test_same_job_uuid_starts_nothing_new(agent, client):
    jid = new_id()
    await client.call("testStepJob", jobUUID=jid, steps=2, stepSeconds=0.5)
    await client.call("testStepJob", jobUUID=jid, steps=2, stepSeconds=0.5)
    # the job's first step runs (its child), and it is the only one
    await until(lambda: _sleep_children(agent.proc.pid), "the job's first step runs",
                timeout=10)
    assert len(_sleep_children(agent.proc.pid)) == 1
    info = await client.wait_job(jid, timeout=20)
    assert info["status"] == "done"
    again = await client.call("testStepJob", jobUUID=jid, steps=2, stepSeconds=0.5)
    assert again == {"jobUUID": jid}
    # a new job would be pending or running from the call on: the done one is
    # unchanged, and no step of it runs
    jobs = await client.call("getJobs", jobUUIDs=[jid])
    assert jobs[jid] == info
    assert _sleep_children(agent.proc.pid) == []


async def test_failed_job_and_clear(client):
    jid = new_id()
    await client.call("testStepJob", jobUUID=jid, steps=3, stepSeconds=0.1, failAt=2)
    info = await client.wait_job(jid, timeout=20)
    assert info["status"] == "failed" and info["error"]["code"] == 100
    assert "step 2" in info["error"]["message"]
    await client.call("clearJob", jobUUID=jid)
    assert await client.call("getJobs", jobUUIDs=[jid]) == {}
    with pytest.raises(RpcError) as e:
        await client.call("clearJob", jobUUID=jid)
    assert e.value.code == 401


# ---- lifecycle ------------------------------------------------------------------

def test_sigterm_exits_zero_and_notifies(agent_factory):
    agent = agent_factory()
    assert "READY=1" in "\n".join(agent.notifications)
    start = time.monotonic()
    rc = agent.stop(signal.SIGTERM, timeout=10)
    assert rc == 0 and time.monotonic() - start < 10
    assert any("STOPPING=1" in n.split("\n") for n in agent.notifications)


@pytest.mark.parametrize("name, content", [
    ("domains.json", b"{garbage"),                         # torn
    ("domains.json", b"[]"),                               # JSON, not its record
    ("prepared.json", b"\0\0\0\0"),                       # zeroed by a file system
    ("prepared.json", b'{"sd/img/vol": {"vm": "1"}}'),
    ("writers.json", b'{"no-key": {"qmpSocket": "/run/q.sock"}}'),
    ("connections/0b6f5bd8-8c1a-4d5e-9f3a-2c1d0e9f8a7b.json", b'{"id": 1}'),
    ("host_id", b"not-a-uuid\n"),                        # was replaced by a new id
])
def test_damaged_state_record_refuses_the_start_by_name(agent_factory, tmp_path, name,
                                                        content):
    """A record of the host's state that cannot be read as one stops the
    start with one line naming it and what to do, not a traceback: starting
    as if it were empty could undo what it guards (running VMs' volumes,
    domains and connections in use)."""
    state = tmp_path / "state"
    agent = agent_factory(state)
    agent.stop()
    record = state / name
    record.write_bytes(content)
    with pytest.raises(RuntimeError, match="did not become ready"):
        agent.start(timeout=20)
    assert agent.proc is not None and agent.proc.wait(10) == 1
    log = agent.log()
    assert "Cannot start: the record of " in log and f"{record} is damaged" in log
    assert "move it aside" in log and "Traceback" not in log
    record.rename(record.with_name(f"{record.name}.damaged"))
    agent.start()


async def test_sigterm_with_running_job_exits_zero(agent_factory, tmp_path):
    state = tmp_path / "state"
    agent = agent_factory(state)
    jid = new_id()
    async with agent.client() as c:
        await c.call("testStepJob", jobUUID=jid, steps=100, stepSeconds=1)
    pid = agent.proc.pid
    await until(lambda: _sleep_children(pid), "the job's child runs", timeout=10)
    children = _sleep_children(pid)
    assert children
    start = time.monotonic()
    rc = agent.stop(signal.SIGTERM, timeout=30)
    assert rc == 0 and time.monotonic() - start < 15
    assert not psutil.wait_procs(children, timeout=2)[1]
    record = json.loads((state / "jobs" / f"{jid}.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["data"]["name"] == "JobInterrupted"


def _record_status(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["status"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


async def test_kill9_then_restart_reports_job_interrupted(agent_factory, tmp_path):
    state = tmp_path / "state"
    agent = agent_factory(state)
    jid = new_id()
    async with agent.client() as c:
        await c.call("testStepJob", jobUUID=jid, steps=100, stepSeconds=1)

        async def running() -> bool:
            return bool((await c.call("getJobs", jobUUIDs=[jid]))[jid]["status"] == "running")

        await until_async(running, "the job runs", timeout=10)
    # the record writer runs off the loop: wait for the running record on disk
    await until(lambda: _record_status(state / "jobs" / f"{jid}.json") == "running",
                "the job's running record is on disk", timeout=10)
    agent.kill()
    again = agent_factory(state, port=agent.port)
    async with again.client() as c:
        info = (await c.call("getJobs", jobUUIDs=[jid]))[jid]
    assert info["status"] == "failed"
    assert info["error"]["data"]["name"] == "JobInterrupted"
    assert "interrupted" in info["error"]["message"]


def test_watchdog_pings_when_asked(agent_factory):
    agent = agent_factory(env={"WATCHDOG_USEC": "200000"})
    assert agent.wait_notify("WATCHDOG=1", timeout=5)


def test_refuses_plain_http_off_loopback(tmp_path):
    conf = tmp_path / "hostagent.toml"
    conf.write_text("[server]\ntls = false\nhost = '0.0.0.0'\n")
    r = subprocess.run([sys.executable, "-m", "agent.daemon", "--config", str(conf)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr


def test_show_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agent.daemon", "--dev", "--state-dir",
                        str(tmp_path), "--port", "4444", "--show-config"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "port = 4444" in r.stdout and 'host = "127.0.0.1"' in r.stdout


def test_dev_pki_created_once(agent_factory, tmp_path):
    state = tmp_path / "state"
    agent = agent_factory(state)
    files = {f: (state / "pki" / f).read_bytes() for f in
             ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    assert oct((state / "pki" / "client.key").stat().st_mode & 0o777) == "0o600"
    agent.stop()
    agent_factory(state, port=agent.port)
    assert files == {f: (state / "pki" / f).read_bytes() for f in files}


# ---- the CLI ----------------------------------------------------------------------

def _cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rpc.cli", "--dev", str(agent.state_dir),
                           "--port", str(agent.port), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_cli_ping_and_values(agent):
    r = _cli(agent, "ping")
    assert r.returncode == 0 and json.loads(r.stdout) == {}
    r = _cli(agent, "getJobs", "jobUUIDs=[]")
    assert r.returncode == 0 and json.loads(r.stdout) == {}


def test_cli_error_exits_nonzero(agent):
    r = _cli(agent, "getJobs", "jobUUIDs=nope")
    assert r.returncode == 1
    err = json.loads(r.stderr)["error"]
    assert err["code"] == -32602 and err["data"]["field"] == "jobUUIDs"


def test_cli_wait_follows_job(agent):
    r = _cli(agent, "--wait", "testStepJob", "steps=3", "stepSeconds=0.2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "done"
    assert "100% done" in r.stderr
