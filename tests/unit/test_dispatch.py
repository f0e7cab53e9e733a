"""The JSON-RPC edge in process: protocol errors, params errors, translation."""

import json

import pytest
from jsonrpcserver import Success

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


# ---- JSON-RPC 2.0 specification, section 7 examples (verbatim) -----------------
# https://www.jsonrpc.org/specification#examples. The spec's methods (sum,
# subtract, get_data, notify_*) take positional params, which the agent's
# verbs refuse: they are added as plain jsonrpcserver methods. Error objects
# are compared on code and message (the agent adds "data", which the spec
# allows).

async def _sum(peer, *args):
    return Success(sum(args))


async def _subtract(peer, *args, **kw):
    if kw:
        return Success(kw["minuend"] - kw["subtrahend"])
    return Success(args[0] - args[1])


async def _get_data(peer):
    return Success(["hello", 5])


async def _notify(peer, *args):
    return Success(None)


@pytest.fixture
async def spec_dispatcher(dispatcher):
    dispatcher.methods.update({"sum": _sum, "subtract": _subtract, "get_data": _get_data,
                               "update": _notify, "notify_hello": _notify,
                               "notify_sum": _notify})
    return dispatcher


def _without_data(answer):
    if isinstance(answer, list):
        return [_without_data(a) for a in answer]
    if isinstance(answer, dict) and "error" in answer:
        answer = dict(answer, error={k: v for k, v in answer["error"].items() if k != "data"})
    return answer


SPEC_EXAMPLES = [
    # rpc call Batch, invalid JSON
    ('''[
  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
  {"jsonrpc": "2.0", "method"
]''', {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}),
    # rpc call with an empty Array
    ("[]", {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
            "id": None}),
    # rpc call with an invalid Batch (but not empty)
    ("[1]", [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
              "id": None}]),
    # rpc call with invalid Batch
    ("[1,2,3]", [
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
         "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
         "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
         "id": None}]),
    # rpc call Batch
    ('''[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]''', [
        {"jsonrpc": "2.0", "result": 7, "id": "1"},
        {"jsonrpc": "2.0", "result": 19, "id": "2"},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
         "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"},
         "id": "5"},
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"}]),
    # rpc call Batch (all notifications)
    ('''[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]''', None),
    # positional and named parameters, notifications, a non-existent method
    ('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
     {"jsonrpc": "2.0", "result": 19, "id": 1}),
    ('{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, '
     '"minuend": 42}, "id": 3}', {"jsonrpc": "2.0", "result": 19, "id": 3}),
    ('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    ('{"jsonrpc": "2.0", "method": "foobar"}', None),
    ('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
     {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"},
      "id": "1"}),
    ('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
     {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}),
    ('{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
     {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
      "id": None}),
]


@pytest.mark.parametrize("body, expected", SPEC_EXAMPLES)
async def test_jsonrpc_spec_examples(spec_dispatcher, body, expected):
    text = await spec_dispatcher.dispatch(body)
    if expected is None:
        assert text == ""
        return
    assert _without_data(json.loads(text)) == expected


async def test_batch_runs_valid_entries_beside_invalid_ones(dispatcher):
    entries = [req("echo", {"volUUID": U}, "a"), 7,
               {"jsonrpc": "2.0", "method": "echo", "params": {"volUUID": U}},
               {"jsonrpc": "2.0", "method": "echo", "id": "ID"},
               req("echo", {"volUUID": U}, 2)]
    r = await call(dispatcher, json.dumps(entries).replace('"ID"', "1e999"))
    assert r[0] == {"jsonrpc": "2.0", "result": {"volUUID": U, "n": 1}, "id": "a"}
    assert r[1]["error"]["code"] == -32600 and r[1]["id"] is None
    assert r[2]["error"]["code"] == -32600 and r[2]["id"] is None
    assert r[3] == {"jsonrpc": "2.0", "result": {"volUUID": U, "n": 1}, "id": 2}
    assert len(r) == 4


def _strict(text):
    def refuse(name):
        raise AssertionError(f"{name} in a reply: not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("rid", [
    "1e999", "-1e999", "1E400", "1" + "0" * 400, "-" + "9" * 5000, "9" * 5000 + ".5",
    "1" + "0" * 309,
])
async def test_ids_outside_double_range_are_invalid_requests(dispatcher, rid):
    body = f'{{"jsonrpc": "2.0", "method": "echo", "params": {{"volUUID": "{U}"}}, "id": {rid}}}'
    r = _strict(await dispatcher.dispatch(body))
    assert r["error"]["code"] == -32600 and r["id"] is None, r


@pytest.mark.parametrize("rid", ["0", "-1", "1.5", "1e300", "9007199254740993",
                                 "1" + "0" * 300, '"x"', "null"])
async def test_ids_in_range_are_echoed(dispatcher, rid):
    body = f'{{"jsonrpc": "2.0", "method": "echo", "params": {{"volUUID": "{U}"}}, "id": {rid}}}'
    r = _strict(await dispatcher.dispatch(body))
    assert r["result"]["volUUID"] == U
    assert r["id"] == json.loads(rid)


@pytest.mark.parametrize("n", ["1e999", "9" * 5000, "-" + "1" * 400])
async def test_huge_numbers_in_params_are_invalid_params(dispatcher, n):
    body = (f'{{"jsonrpc": "2.0", "method": "echo", "params": {{"volUUID": "{U}", "n": {n}}}, '
            '"id": 1}')
    r = _strict(await dispatcher.dispatch(body))
    assert r["error"]["code"] == -32602 and r["error"]["data"]["field"] == "n", r


async def test_a_non_finite_result_is_not_sent_as_json(dispatcher):
    async def nan(peer):
        return Success({"x": float("nan")})
    dispatcher.methods["nan"] = nan
    r = _strict(await dispatcher.dispatch('{"jsonrpc": "2.0", "method": "nan", "id": 4}'))
    assert r["error"]["code"] == 100 and r["id"] == 4
