"""JSON-RPC dispatch (jsonrpcserver) with the one error translator.

Every verb of the table becomes a jsonrpcserver method that validates its
named params with the verb's schema, runs the handler with a request id in
the log context, and turns errors into JSON-RPC error objects:
InvalidParams -> -32602 naming the field, HostAgentError -> its code and
fields, anything unexpected -> 100 with a generic message (the traceback
goes to the log with the request id, never to the client).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
import random
import sys
import time
from typing import Any

from jsonrpcserver import Error, Result, Success
from jsonrpcserver.async_dispatcher import call as call_method
from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.dispatcher import create_request, to_response
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.sentinels import NOID

from agent import __version__, logs
from agent.context import Agent
from rpc.openrpc import error_object, method_errors
from rpc.schema import InvalidParams, field_schema, redact
from rpc.table import Verb
from storage.errors import GeneralException, HostAgentError, error_table, wire_error

log = logging.getLogger("rpc.dispatch")

GENERIC_MESSAGE = wire_error(Exception())["message"]

# Requests in one batch. They run concurrently, so a batch is also a
# concurrency limit; a larger one is refused whole with -32600.
MAX_BATCH = 1000


def _error(err: dict[str, Any]) -> Result:
    return Error(err["code"], err["message"], err.get("data"))


class Dispatcher:
    def __init__(self, agent: Agent, verbs: dict[str, Verb]) -> None:
        self.agent = agent
        self.verbs = verbs
        self.methods: dict[str, Any] = {name: self._method(v) for name, v in verbs.items()}
        self.methods["rpc.discover"] = self._discover
        # Methods that any params bind to (peer, then *args and **params):
        # jsonrpcserver's signature check cannot fail for them, so it is
        # not run per call. They check their params themselves.
        self._binds_any = frozenset(m for m in self.methods.values() if _binds_any(m))
        self.openrpc = openrpc_document(verbs)

    async def dispatch(self, body: str, peer: str = "") -> str:
        """A request or batch in, the response text out ("" for notifications).

        A batch is split here, as JSON-RPC 2.0 section 6 says: each entry is
        checked and answered on its own (an invalid one with -32600 and id
        null), the valid ones run concurrently, notifications get no answer.
        jsonrpcserver would refuse the whole batch for one invalid entry."""
        try:
            request = _loads(body)
        except ValueError as e:
            return _protocol_error(-32700, "Parse error", str(e))
        if not isinstance(request, list):
            answer = await self._one(request, peer)
            return "" if answer is None else _dumps(answer)
        if not request:
            return _protocol_error(-32600, "Invalid Request", "an empty batch")
        if len(request) > MAX_BATCH:
            return _protocol_error(-32600, "Invalid Request",
                                   f"a batch holds at most {MAX_BATCH} requests")
        answers = await asyncio.gather(*(self._one(item, peer) for item in request))
        parts = [_dumps(a) for a in answers if a is not None]
        return f"[{', '.join(parts)}]" if parts else ""

    async def _one(self, request: Any, peer: str) -> dict[str, Any] | None:
        """One request's answer as a JSON object; None for a notification."""
        try:
            _check_one(request)
        except ValueError as e:
            return _invalid_request(str(e))
        # jsonrpcserver's own steps for one request (create_request, call,
        # to_response), without its pipeline around them (issue 21: that
        # cost 39-45 us per call, most of the agent's own part of a ping):
        # the body is already parsed and checked here, a single request
        # needs no asyncio.gather, Either chain nor typing isinstance, and
        # the signature binding is skipped for the methods any params bind
        # to (_binds_any).
        req = create_request(request)
        method = self.methods.get(req.method)
        if method is not None and method in self._binds_any:
            result = await call_method(req, peer, method)
        else:   # an unknown method, or one with a signature to check
            _, result = await dispatch_request(self.methods, peer, req)
        if req.id is NOID:
            return None
        answer = to_serializable_one(to_response(req, result))
        assert isinstance(answer, dict)
        return answer

    async def _discover(self, peer: str, /, *args: Any, **params: Any) -> Result:
        if args or params:
            field = next(iter(params), "params")
            return _error(InvalidParams(field, "unknown parameter").to_dict())
        return Success(self.openrpc)

    def _method(self, verb: Verb) -> Any:
        metrics = self.agent.metrics
        agent = self.agent
        debug_enabled = functools.partial(log.isEnabledFor, logging.DEBUG)
        calls_ok = metrics.calls.labels(verb.name, "ok")
        latency = metrics.latency.labels(verb.name)

        # peer is positional-only: a request param named "peer" lands in
        # params and is refused as unknown, like any other.
        async def method(peer: str, /, *args: Any, **params: Any) -> Result:
            # a log correlation id, not a secret: os.urandom's syscall was
            # 14% of dispatching a ping (issue 21)
            rid = f"{random.getrandbits(32):08x}"
            logs.request_id.set(rid)
            start = time.perf_counter()
            outcome = "ok"
            try:
                if args:
                    raise InvalidParams("params", "params must be an object (named params)")
                values = verb.validate(params)
                if debug_enabled():
                    log.debug("%s %s from %s", verb.name, redact(verb.params, values), peer)
                result = await verb.handler(agent, **values)
                return Success(result)
            except InvalidParams as e:
                outcome = "invalid"
                log.info("%s refused: %s", verb.name, e)
                return _error(e.to_dict())
            except HostAgentError as e:
                outcome = e.name
                log.info("%s failed: %s (%d)", verb.name, e.message, e.code)
                return _error(wire_error(e))
            except Exception as e:
                outcome = "unexpected"
                log.exception("%s failed unexpectedly (request %s)", verb.name, rid)
                err = wire_error(e)
                return _error({**err, "data": {**err["data"], "requestId": rid}})
            finally:
                latency.observe(time.perf_counter() - start)
                if outcome == "ok":
                    calls_ok.inc()
                else:
                    metrics.calls.labels(verb.name, outcome).inc()
                logs.request_id.set("")

        method.__name__ = verb.name
        # jsonrpcserver binds every call against the signature: computing it
        # once here saves that work on each request.
        method.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
        return method


def _binds_any(method: Any) -> bool:
    kinds = [p.kind for p in inspect.signature(method).parameters.values()]
    return kinds == [inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL,
                     inspect.Parameter.VAR_KEYWORD]


def _check_one(request: Any) -> None:
    if not isinstance(request, dict):
        raise ValueError("a request must be an object")
    if request.get("jsonrpc") != "2.0":
        raise ValueError('"jsonrpc" must be "2.0"')
    if not isinstance(request.get("method"), str):
        raise ValueError('"method" must be a string')
    if "params" in request and not isinstance(request["params"], dict | list):
        raise ValueError('"params" must be an object or an array')
    if "id" in request:
        rid = request["id"]
        if isinstance(rid, bool) or not isinstance(rid, str | int | float | None):
            raise ValueError('"id" must be a string, a number or null')
        if isinstance(rid, int | float) and not _finite(rid):
            raise ValueError('"id" is a number outside the range of a double')
    extra = set(request) - {"jsonrpc", "method", "params", "id"}
    if extra:
        raise ValueError(f"unknown member {sorted(extra)[0]!r}")


def _finite(number: int | float) -> bool:
    # integers were read within a double's range (_int)
    return math.isfinite(number)


def _invalid_request(reason: str) -> dict[str, Any]:
    # id null: JSON-RPC 2.0 section 5, the id of an invalid request is not read
    return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request",
                                        "data": reason}, "id": None}


def _protocol_error(code: int, message: str, data: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "error": {"code": code, "message": message,
                                                   "data": data}, "id": None})


def _dumps(answer: dict[str, Any]) -> str:
    """An answer as strict JSON. Python writes NaN and Infinity, which are
    not JSON: a result holding one (a bug) becomes error 100, with the
    request's id (ids are checked finite)."""
    try:
        return _ENCODER.encode(answer)
    except ValueError:
        log.error("answer to request id %r is not JSON (a non-finite number)",
                  answer.get("id"))
        return json.dumps({"jsonrpc": "2.0", "id": answer.get("id"),
                           "error": wire_error(ValueError())})


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not JSON")


# Digits beyond which an integer is outside a double's range (1.8e308)
# whatever they are; also below Python's int() limit of 4300 digits.
INT_DIGITS = 310


def _int(text: str) -> int | float:
    # As a double-based reader sees it: out of range is infinite, which the
    # id check refuses. int() of 4300+ digits would raise.
    value = int(text) if len(text.lstrip("-")) <= INT_DIGITS else math.inf
    if abs(value) > sys.float_info.max:
        return -math.inf if text.startswith("-") else math.inf
    return value


def _loads(text: str) -> Any:
    # json.loads raises RecursionError on absurd nesting: report it as a
    # parse error like any other undecodable body.
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# Made once: json.loads and json.dumps build a new decoder or encoder on
# every call given any option (issue 21: a few us of each request).
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_int=_int)
_ENCODER = json.JSONEncoder(allow_nan=False)


def openrpc_document(verbs: dict[str, Verb]) -> dict[str, Any]:
    methods = []
    for verb in verbs.values():
        methods.append({
            "name": verb.name,
            "summary": verb.summary,
            "paramStructure": "by-name",
            "params": [{"name": f.name, "required": f.required, "schema": field_schema(f),
                        **({"description": f.description} if f.description else {})}
                       for f in verb.params],
            "result": {"name": "result", "schema": verb.result or {}},
            "errors": method_errors(verb),
            **({"tags": [{"name": t} for t in (*verb.tags, *(("job",) if verb.job else ()))]}
               if verb.tags or verb.job else {}),
        })
    methods.append({"name": "rpc.discover", "summary": "This OpenRPC document.",
                    "params": [], "result": {"name": "OpenRPC document",
                                             "schema": {"type": "object"}},
                    "errors": [error_object(GeneralException)]})
    return {
        "openrpc": "1.2.6",
        "info": {"title": "hostagent", "version": __version__,
                 "description": "Storage agent of a virtualization host."},
        "methods": methods,
        "components": {"x-errors": error_table()},
    }
