"""The JSON-RPC edge in process: protocol errors, params errors, translation."""

import json

import pytest

from agent import config as cfg
from agent.context import Agent
from rpc.dispatch import Dispatcher
from rpc.schema import UUID, Field, Int
from rpc.table import VerbTable
from storage.errors import VolumeDoesNotExist

U = "8c3f1e56-2c1d-4a3b-9f5e-0123456789ab"

table = VerbTable()


@table.verb("echo", "Echo params", [Field("volUUID", UUID()),
                                     Field("n", Int(0, 10), required=False, default=1)])
async def echo(agent, volUUID, n):
    return {"volUUID": volUUID, "n": n}


@table.verb("missingVolume", "Raise a typed error", [Field("volUUID", UUID())])
async def missing_volume(agent, volUUID):
    raise VolumeDoesNotExist(volUUID=volUUID)


@table.verb("boom", "Raise an unexpected error")
async def boom(agent):
    raise RuntimeError("password=hunter2 in /secret/path")


@pytest.fixture
async def dispatcher(tmp_path):
    config = cfg.load(tmp_path / "none.toml", cfg.dev_overrides(tmp_path, 1))
    agent = Agent.create(config)
    await agent.start()
    yield Dispatcher(agent, table.enabled(config))
    await agent.stop()


async def call(d, body):
    text = await d.dispatch(body if isinstance(body, str) else json.dumps(body))
    return json.loads(text) if text else None


def req(method, params=None, id=1):
    r = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        r["params"] = params
    return r


async def test_success(dispatcher):
    r = await call(dispatcher, req("echo", {"volUUID": U}))
    assert r == {"jsonrpc": "2.0", "result": {"volUUID": U, "n": 1}, "id": 1}


async def test_batch(dispatcher):
    r = await call(dispatcher, [req("echo", {"volUUID": U}, 1), req("nope", {}, 2),
                                req("echo", {"volUUID": "x"}, 3)])
    by_id = {x["id"]: x for x in r}
    assert by_id[1]["result"]["volUUID"] == U
    assert by_id[2]["error"]["code"] == -32601
    assert by_id[3]["error"]["code"] == -32602


async def test_notification_gets_no_response(dispatcher):
    assert await call(dispatcher, {"jsonrpc": "2.0", "method": "echo",
                                   "params": {"volUUID": U}}) is None


@pytest.mark.parametrize("body, code", [
    ("{not json", -32700),
    ("[" * 100000 + "]" * 100000, -32700),
    ('{"jsonrpc": "2.0", "id": 1}', -32600),
    ("[]", -32600),
    ('{"jsonrpc": "1.0", "method": "echo", "id": 1}', -32600),
])
async def test_protocol_errors(dispatcher, body, code):
    r = await call(dispatcher, body)
    assert r["error"]["code"] == code


@pytest.mark.parametrize("params, field", [
    ({}, "volUUID"),
    ({"volUUID": "ABC"}, "volUUID"),
    ({"volUUID": U, "n": "3"}, "n"),
    ({"volUUID": U, "n": 11}, "n"),
    ({"volUUID": U, "extra": 1}, "extra"),
    ([U], "params"),
])
async def test_invalid_params_name_the_field(dispatcher, params, field):
    r = await call(dispatcher, req("echo", params))
    assert r["error"]["code"] == -32602
    assert r["error"]["data"]["field"] == field
    assert field in r["error"]["message"]


async def test_typed_error_keeps_code_and_fields(dispatcher):
    r = await call(dispatcher, req("missingVolume", {"volUUID": U}))
    assert r["error"] == {"code": 201, "message": f"Volume does not exist: {U}",
                          "data": {"name": "VolumeDoesNotExist", "volUUID": U}}


async def test_unexpected_error_does_not_leak(dispatcher, caplog):
    r = await call(dispatcher, req("boom", {}))
    err = r["error"]
    assert err["code"] == 100 and err["data"]["name"] == "GeneralException"
    assert "hunter2" not in json.dumps(r) and "RuntimeError" not in json.dumps(r)
    rid = err["data"]["requestId"]
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert logged and rid in logged[0].getMessage()


async def test_discover_lists_verbs_with_params(dispatcher):
    r = await call(dispatcher, req("rpc.discover"))
    doc = r["result"]
    assert doc["openrpc"].startswith("1.")
    methods = {m["name"]: m for m in doc["methods"]}
    assert set(methods) == {"echo", "missingVolume", "boom", "rpc.discover"}
    params = {p["name"]: p for p in methods["echo"]["params"]}
    assert params["volUUID"]["required"] and params["volUUID"]["schema"]["format"] == "uuid"
    assert params["n"]["schema"]["maximum"] == 10
    assert {"code": 201, "name": "VolumeDoesNotExist"}.items() <= \
        next(e for e in doc["components"]["x-errors"] if e["code"] == 201).items()


async def test_metrics_count_calls(dispatcher):
    await call(dispatcher, req("echo", {"volUUID": U}))
    await call(dispatcher, req("echo", {"volUUID": "bad"}))
    text = dispatcher.agent.metrics.render().decode()
    assert 'hostagent_rpc_calls_total{outcome="ok",verb="echo"} 1.0' in text
    assert 'hostagent_rpc_calls_total{outcome="invalid",verb="echo"} 1.0' in text
