"""Hostile input through the real agent: every verb of the table fuzzed from
its declared params (hypothesis), and command-line injection attempts
through the strings that reach a tool.

One agent (no test verbs) serves a localfs domain with a few volumes. For
each served verb, params are generated from the JSON Schema of its Fields:
wrong ones (wrong types, out of range, bad UUIDs, unknown enum values,
missing or extra fields, huge, control, shell and unicode strings) and
valid-looking ones with random UUIDs (unknown domains, images, volumes).
The schema itself is the oracle: params it refuses must be answered -32602
naming the same field; anything else must end in a storage error code or a
result, never 100 or an internal error, and nothing on storage may change.
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rpc.verbs  # noqa: F401 - fills TABLE
from rpc.client import client_ssl_context
from rpc.schema import InvalidParams, field_schema
from rpc.table import TABLE, Verb
from storage.errors import error_table
from tests.agentproc import AgentProcess

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Storage error codes an answer may carry; 100 is the unexpected-error code.
STORAGE_CODES = {e["code"] for e in error_table()} - {100}
# Where a successful injection would leave its mark.
PWNED = Path("/tmp") / f"hostagent-pwned-{os.getpid()}"
# Verbs with these tags reach the network or the host's devices with valid
# params (mounts, iSCSI logins, discovery): they are fuzzed with wrong
# params only; their valid params are tested in their own suites.
HOST_REACHING_TAGS = {"connections", "devices"}
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "20"))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=IN_CI,
                print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


def new_id() -> str:
    return str(uuid.uuid4())


def strict_loads(text: str) -> Any:
    """json.loads refusing NaN and Infinity: every reply must be JSON."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a reply: not JSON")
    return json.loads(text, parse_constant=refuse)


# ---- a small blocking client (hypothesis drives plain functions) --------------

class Rpc:
    """JSON-RPC over one keep-alive HTTPS connection with the dev client cert."""

    def __init__(self, agent: AgentProcess) -> None:
        pki = agent.pki
        self.ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        self.port = agent.port
        self.conn: http.client.HTTPSConnection | None = None
        self.ids = 0

    def post(self, body: bytes) -> tuple[int, str]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                                        context=self.ctx, timeout=120)
            try:
                self.conn.request("POST", "/jsonrpc", body=body,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.read().decode("utf-8")
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, params: Any) -> dict[str, Any]:
        """The whole response object of one call."""
        self.ids += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method,
                           "params": params})
        status, text = self.post(body.encode("utf-8", "surrogatepass"))
        assert status == 200, (method, status, text[:500])
        assert "Traceback" not in text and 'File "' not in text, text[:2000]
        response: dict[str, Any] = strict_loads(text)
        return response

    def call(self, method: str, **params: Any) -> Any:
        response = self.request(method, params)
        assert "error" not in response, (method, response)
        return response["result"]

    def batch(self, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
        """Results of several calls sent as one batch (each must succeed)."""
        requests = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                    for i, (m, p) in enumerate(calls)]
        status, text = self.post(json.dumps(requests).encode())
        assert status == 200, text[:500]
        by_id = {r["id"]: r for r in strict_loads(text)}
        assert all("result" in r for r in by_id.values()), text[:2000]
        return [by_id[i]["result"] for i in range(len(calls))]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---- the agent and its domain ---------------------------------------------------

@dataclass
class Target:
    agent: AgentProcess
    rpc: Rpc
    root: Path          # the localfs directory holding the domain
    sd: str
    conn_id: str
    images: dict[str, list[str]]
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """What must not change: the domain's files and what the agent lists."""
        files = {}
        for path in sorted(self.root.rglob("*")):
            st_ = path.lstat()
            files[str(path.relative_to(self.root))] = (st_.st_mode, st_.st_size,
                                                       st_.st_mtime_ns)
        domains, volumes, connections = self.rpc.batch(
            ("getStorageDomainsList", {}), ("getVolumesList", {"sdUUID": self.sd}),
            ("getStorageConnections", {}))
        return {
            "files": files,
            "domains": domains,
            "volumes": volumes,
            "connections": connections,
            "mounts": [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                       if str(self.agent.state_dir) in line],
        }


def wait_job(rpc: Rpc, job: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = rpc.call("getJobs", jobUUIDs=[job])[job]
        if info["status"] in ("done", "failed", "aborted"):
            return info
        assert time.monotonic() < deadline, f"job {job} still {info['status']}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "localfs"
    root.mkdir()
    agent = AgentProcess(base / "state").start()
    rpc = Rpc(agent)
    try:
        conn_id, sd = new_id(), new_id()
        [status] = rpc.call("connectStorageServer", domType="localfs",
                            connectionParams=[{"id": conn_id, "connection": str(root)}])
        assert status["status"] == 0, status
        rpc.call("createStorageDomain", sdUUID=sd, domType="localfs", name="hostile",
                 connectionId=conn_id, ovfStore=False)
        images: dict[str, list[str]] = {}
        for fmt in ("raw", "cow"):
            img, vol, job = new_id(), new_id(), new_id()
            rpc.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                     size=1 << 20, format=fmt, preallocate="sparse")
            assert wait_job(rpc, job)["status"] == "done"
            rpc.call("clearJob", jobUUID=job)
            images[img] = [vol]
        t = Target(agent, rpc, root, sd, conn_id, images)
        t.baseline = t.state()
        yield t
        for conn in rpc.call("getStorageConnections"):
            rpc.call("disconnectStorageServer", domType=conn["type"],
                     connectionParams=[{"id": conn["id"], **conn["params"]}])
    finally:
        rpc.close()
        rc = agent.stop()
    assert rc == 0, agent.log()


def all_verbs() -> list[str]:
    """Every verb an agent without test verbs serves."""
    return [n for n, v in TABLE.all().items() if not v.test_only]


# ---- strategies from each verb's JSON Schema ------------------------------------

HOSTILE_STRINGS = [
    "-o remount", "--help", "-", "-rf", " -o remount", "--",
    f"; touch {PWNED}", f"$(touch {PWNED})", f"`touch {PWNED}`", f"| touch {PWNED}",
    f"&& touch {PWNED}", f"x\ntouch {PWNED}", "a\x00b", "a\rb", "tab\there",
    "../../../../etc/passwd", "..", "../", "/", "/etc/shadow", "~root", "$HOME", "${IFS}",
    "rw,remount", "bind", "ro,bind", "remount", "X-mount.mkdir", "x-mount.owner=0",
    "uhelper=/tmp/x", "helper=/tmp/x", "loop,offset=0",
    "'\"\\", "%s%s%n", "{0}{1}", "*", "?", "[a-z]", "\u202eevil", "\u00e9\u00e8\u4e2d\U0001f600",
    "\ud800", "a\udc80b", "\ufeff", "\x7f", "\x1b[31m", "x\u2028CAP=1", "x\x85CTIME=0",
    "x\u2029BACKUP=true", "x\x0bNAME=y", "x\x1eLEGALITY=ILLEGAL",
    "fuse.touch", "fuse", "fuseblk.sh", f"touch#{PWNED}",
    "127.0.0.1:/export;id", "127.0.0.1:/export -o remount", "host:/../../",
    "iqn.2003-01.org.x:t\n-o", "iqn.2003-01.org.x:t -I default",
    "A" * 5000, "\u00e9" * 4097, "x" * 70000,
]
# Ways to spoil a canonical UUID.
UUID_SPOILERS = [
    str.upper, lambda u: "{" + u + "}", lambda u: u + "\n", lambda u: "\n" + u,
    lambda u: u + " ", lambda u: u.replace("-", ""), lambda u: u[:-1] + "g",
    lambda u: "../" + u, lambda u: u + "/..", lambda u: "-" + u[1:], lambda u: u + "\x00",
    lambda u: u + "\ud800", lambda u: u[:-1], lambda u: u + "0", lambda u: "urn:uuid:" + u,
    lambda u: u.replace("-", "_"), lambda u: f"{u}\n{u}",
]
bad_uuids = st.one_of(st.sampled_from(["", "1234", "not-a-uuid", "-", "*", "..", "/"]),
                      st.builds(lambda u, spoil: spoil(str(u)), st.uuids(),
                                st.sampled_from(UUID_SPOILERS)))
EXTRA_NAMES = ["peer", "args", "params", "self", "agent", "jobUUID", "__class__", "",
               "x" * 300, "sdUUID ", "SDUUID", "\u00e9", "-o", "password"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars,
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4)),
                           max_leaves=12)
deep_nesting = st.integers(10, 300).map(lambda n: json.loads("[" * n + "]" * n))
hostile_text = st.one_of(st.sampled_from(HOSTILE_STRINGS),
                         st.text(max_size=40),
                         st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
                         .map(lambda s: "-" + s))


def _types(schema: dict[str, Any]) -> set[str]:
    if "enum" in schema:
        return {"string"}
    if "oneOf" in schema:
        return set().union(*(_types(s) for s in schema["oneOf"]))
    t = schema.get("type")
    if t is None:
        return set()
    return {t} if isinstance(t, str) else set(t)


def valid_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema (probably) accepts; UUIDs are always random ones."""
    if "oneOf" in schema:
        return st.one_of([valid_values(s) for s in schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    t = schema.get("type")
    if t == "string":
        if schema.get("format") == "uuid":
            return st.uuids().map(str)
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 100), 100)
        if "pattern" in schema:
            pattern = schema["pattern"]
            return st.from_regex(pattern, fullmatch=True).filter(
                lambda s: lo <= len(s) <= schema.get("maxLength", 4096))
        return st.one_of(st.text(min_size=lo, max_size=max(lo, hi)), hostile_text)
    if t == "integer":
        lo, hi = schema.get("minimum", -2**40), schema.get("maximum", 2**40)
        step = schema.get("multipleOf", 1)
        return st.integers(-(-lo // step), hi // step).map(lambda n: n * step)
    if t == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False,
                         allow_infinity=False)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        lo = schema.get("minItems", 0)
        return st.lists(valid_values(schema.get("items", {})), min_size=lo,
                        max_size=min(schema.get("maxItems", lo + 3), lo + 3))
    if t == "object":
        return object_values(schema.get("properties", {}), schema.get("required", []))
    return json_values


def object_values(props: dict[str, dict[str, Any]],
                  required: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {n: valid_values(s) for n, s in props.items() if n in required},
        optional={n: valid_values(s) for n, s in props.items() if n not in required})


def wrong_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema (most likely) refuses."""
    types = _types(schema)
    other_type = st.one_of(
        *[s for name, s in [("null", st.none()), ("boolean", st.booleans()),
                            ("integer", st.integers(-2**70, 2**70)),
                            ("number", st.floats(allow_nan=False, allow_infinity=False)),
                            ("string", st.text(max_size=10)),
                            ("array", st.lists(json_scalars, max_size=3)),
                            ("object", st.dictionaries(st.text(max_size=5), json_scalars,
                                                       max_size=3))]
          if name not in types and not (name == "number" and "integer" in types)],
        deep_nesting)
    # Specific wrong values first, several times: one_of picks branches evenly.
    wrong: list[st.SearchStrategy[Any]] = []
    if "enum" in schema:
        values = schema["enum"]
        wrong.append(st.one_of(st.sampled_from([v.upper() for v in values]
                                               + [v + " " for v in values]
                                               + ["", "auto ", "qcow2", "\u00e9"]),
                               hostile_text).filter(lambda v: v not in values))
    elif "string" in types:
        if schema.get("format") == "uuid":
            wrong += [bad_uuids] * 3
        wrong += [hostile_text] * 2
        hi = schema.get("maxLength")
        if hi is not None:
            wrong.append(st.integers(1, 3).map(lambda n: "a" * (hi + n)))
        if schema.get("minLength", 0) > 0:
            wrong.append(st.just(""))
    if "integer" in types or "number" in types:
        if "minimum" in schema:
            low: int = schema["minimum"]
            wrong.append(st.integers(1, 2**70).map(lambda n: low - n))
        if "maximum" in schema:
            high: int = schema["maximum"]
            wrong.append(st.integers(1, 2**70).map(lambda n: high + n))
        if "multipleOf" in schema:
            step: int = schema["multipleOf"]
            wrong.append(st.integers(1, 2**30).map(lambda n: n * step + 1))
        wrong.append(st.floats(-1e20, 1e20, allow_nan=False).map(lambda f: float(int(f))))
        wrong.append(st.sampled_from(["1", "0x10", "1e3", True, 1.5]))
    if "array" in types and "items" in schema:
        items = schema["items"]
        wrong.append(st.lists(wrong_values(items), min_size=1, max_size=3))
        if "maxItems" in schema and schema["maxItems"] < 20000:
            most: int = schema["maxItems"]
            wrong.append(st.lists(valid_values(items), min_size=1, max_size=1).map(
                lambda one: one * (most + 1)))
        if schema.get("minItems", 0) > 0:
            wrong.append(st.just([]))
    if "object" in types and "properties" in schema:
        wrong.append(wrong_objects(schema["properties"], schema.get("required", [])))
    return st.one_of(*wrong, other_type)


def wrong_objects(props: dict[str, dict[str, Any]],
                  required: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """An object of these properties with one thing wrong."""
    good = object_values(props, required)

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        value = dict(draw(good))
        kinds = ["extra"]
        if props:
            kinds += ["field"] * 3
        if required:
            kinds.append("missing")
        kind = draw(st.sampled_from(kinds))
        if kind == "field":
            name = draw(st.sampled_from(sorted(props)))
            value[name] = draw(wrong_values(props[name]))
        elif kind == "missing":
            value.pop(draw(st.sampled_from(required)))
        else:
            name = draw(st.sampled_from(EXTRA_NAMES) | st.text(max_size=12))
            assume(name not in props)
            value[name] = draw(json_values)
        return value

    return mutate()


def verb_schema(verb: Verb) -> tuple[dict[str, dict[str, Any]], list[str]]:
    return ({f.name: field_schema(f) for f in verb.params},
            [f.name for f in verb.params if f.required])


def oracle(verb: Verb, params: Any) -> str | None:
    """The field the agent must name in its -32602, or None if the schema
    accepts the params."""
    if isinstance(params, list):
        if params:
            return "params"
        params = {}
    try:
        verb.validate(copy.deepcopy(params))
    except InvalidParams as e:
        return e.field
    return None


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Controls, line separators of str.splitlines(), lone surrogates.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def certainly_invalid(schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    """Paths of values that no schema of this API may accept, checked
    without the schema code under test: a UUID that is not canonical, a
    string with a control character or a lone surrogate."""
    if isinstance(value, str):
        if schema.get("format") == "uuid" and not CANONICAL_UUID.fullmatch(value):
            yield path
        elif CONTROL.search(value):
            yield path
    elif isinstance(value, dict):
        props = schema.get("properties", {})
        for name, v in value.items():
            yield from certainly_invalid(props.get(name, {}), v, f"{path}.{name}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from certainly_invalid(schema.get("items", {}), v, f"{path}[{i}]")


def expected_field(verb: Verb, params: Any) -> str | None:
    """The schema's verdict, cross-checked: params with a certainly invalid
    value must be refused."""
    field = oracle(verb, params)
    if field is None and isinstance(params, dict):
        props, _ = verb_schema(verb)
        bad = list(certainly_invalid({"properties": props}, params, "params"))
        assert not bad, (verb.name, params, "the schema accepts", bad)
    return field


# ---- the fuzzing test -------------------------------------------------------------

def check_answer(t: Target, verb: Verb, params: Any, expect_field: str | None) -> None:
    response = t.rpc.request(verb.name, params)
    if "error" in response:
        error = response["error"]
        code = error["code"]
        if expect_field is not None:
            assert code == -32602, (verb.name, params, response)
            data = error.get("data")
            assert isinstance(data, dict) and data.get("field") == expect_field, \
                (verb.name, params, "must name the field", expect_field, response)
            assert expect_field in error["message"]
        else:
            assert code == -32602 or code in STORAGE_CODES, (verb.name, params, response)
    else:
        assert expect_field is None, (verb.name, params, "accepted", response)
        result = response["result"]
        if verb.job and isinstance(result, dict) and "jobUUID" in result:
            info = wait_job(t.rpc, result["jobUUID"])
            assert info["status"] == "failed", (verb.name, params, info)
            assert info["error"]["code"] in STORAGE_CODES, (verb.name, params, info)
            t.rpc.call("clearJob", jobUUID=result["jobUUID"])
    assert t.state() == t.baseline, (verb.name, params, "changed storage")
    assert not PWNED.exists(), (verb.name, params, "a command ran")


@pytest.mark.parametrize("name", all_verbs())
def test_wrong_params_are_refused(target: Target, name: str) -> None:
    """Params the schema refuses: -32602 naming the field, nothing changed."""
    verb = TABLE.all()[name]
    props, required = verb_schema(verb)
    strategy = st.one_of(wrong_objects(props, required),
                         st.lists(json_scalars, min_size=1, max_size=3))

    @FUZZ
    @given(params=strategy)
    def run(params: Any) -> None:
        field = expected_field(verb, params)
        assume(field is not None)
        check_answer(target, verb, params, field)

    run()


def _lookup_only(verb: Verb) -> bool:
    """A verb that acts on an existing volume or image of a domain: with
    the real domain and an unknown image or volume it can only fail its
    lookup (not a job, which might create; not a domain-wide verb like
    formatStorageDomain, which has no other id to miss)."""
    required = {f.name for f in verb.params if f.required}
    return not verb.job and {"sdUUID", "imgUUID"} <= required


@pytest.mark.parametrize("name", [n for n in all_verbs()
                                  if not HOST_REACHING_TAGS & set(TABLE.all()[n].tags)])
def test_unknown_targets_fail_cleanly(target: Target, name: str) -> None:
    """Valid-looking params naming random (unknown) domains, images, volumes
    and jobs: a storage error (or a harmless result), never 100, and
    nothing changed on storage; a job fails with a storage error. Verbs
    that look up a volume also get the real domain (and image) with an
    unknown image (volume)."""
    verb = TABLE.all()[name]
    props, required = verb_schema(verb)
    known = {target.sd, target.conn_id, *target.images,
             *(v for vols in target.images.values() for v in vols)}

    @FUZZ
    @given(params=object_values(props, required), real=st.sampled_from(["", "sd", "img"]),
           image=st.sampled_from(sorted(target.images)))
    def run(params: dict[str, Any], real: str, image: str) -> None:
        assert not known & set(_strings(params)), "a real target slipped in"
        if real and _lookup_only(verb):
            params["sdUUID"] = target.sd
            if real == "img" and "volUUID" in params:
                params["imgUUID"] = image
        check_answer(target, verb, params, expected_field(verb, params))

    run()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_every_verb_is_fuzzed(target: Target) -> None:
    """The fuzzer walks the table: every verb the agent serves is covered."""
    served = {m["name"] for m in target.rpc.call("rpc.discover")["methods"]}
    assert served - {"rpc.discover"} == set(all_verbs())
    assert len(all_verbs()) >= 30


# ---- command-line injection through the strings that reach a tool ----------------

INJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    # (domType, connection params without id, the field that must be named)
    ("posixfs", {"connection": "-o remount", "vfs_type": "ext4"}, "connection"),
    ("posixfs", {"connection": "--bind", "vfs_type": "ext4"}, "connection"),
    ("posixfs", {"connection": "/dev/null\n-o remount", "vfs_type": "ext4"}, "connection"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "-o"}, "vfs_type"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4 -o remount"}, "vfs_type"),
    ("posixfs", {"connection": f"$(touch {PWNED})", "vfs_type": "fuse.touch"}, "vfs_type"),
    ("posixfs", {"connection": f"touch#{PWNED}", "vfs_type": "fuse"}, "vfs_type"),
    ("posixfs", {"connection": str(PWNED), "vfs_type": "fuseblk.sh"}, "vfs_type"),
    ("posixfs", {"connection": f"touch#{PWNED}", "vfs_type": "fuse3"}, "vfs_type"),
    ("posixfs", {"connection": f"touch#{PWNED}", "vfs_type": "fuseblk"}, "vfs_type"),
    ("posixfs", {"connection": str(PWNED), "vfs_type": "ext4.touch"}, "vfs_type"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4", "mnt_options": "remount"},
     "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "ro,bind"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "-o remount"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "ro\nremount"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "X-mount.mkdir=0700"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "X-mount.owner=0,X-mount.mode=4777"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": f"helper={PWNED}"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": f"uhelper={PWNED}"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": f"ro;touch {PWNED}"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "ro,,rw"}, "mnt_options"),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4",
                 "mnt_options": "ro, -o"}, "mnt_options"),
    ("nfs", {"connection": "-o remount:/x"}, "connection"),
    ("nfs", {"connection": f"127.0.0.1:/x $(touch {PWNED})"}, "connection"),
    ("nfs", {"connection": "127.0.0.1:/x\n-o remount"}, "connection"),
    ("nfs", {"connection": "127.0.0.1:/x", "mnt_options": "vers=2"}, "mnt_options"),
    ("nfs", {"connection": "127.0.0.1:/x", "mnt_options": "hard"}, "mnt_options"),
    ("nfs", {"connection": "127.0.0.1:/x", "mnt_options": "remount"}, "mnt_options"),
    ("nfs", {"connection": "127.0.0.1:/x", "protocol_version": "3 -o remount"},
     "protocol_version"),
    ("localfs", {"connection": "relative/dir"}, "connection"),
    ("localfs", {"connection": "-/tmp"}, "connection"),
    ("localfs", {"connection": "/tmp/x\n/etc"}, "connection"),
    ("localfs", {"connection": "/tmp/\ud800"}, "connection"),
    ("iscsi", {"connection": "-p 127.0.0.1", "iqn": "iqn.2003-01.org.x:t"}, "connection"),
    ("iscsi", {"connection": "127.0.0.1;id", "iqn": "iqn.2003-01.org.x:t"}, "connection"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "-T iqn.2003-01.org.x:t"}, "iqn"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t -o delete"}, "iqn"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t\nnode.startup"},
     "iqn"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t",
               "ifaceName": "-o delete"}, "ifaceName"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t",
               "ifaceName": "../../etc/iscsi"}, "ifaceName"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t",
               "initiatorName": "$(id)"}, "initiatorName"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t",
               "user": "-v", "password": "x"}, "user"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t",
               "user": "u", "password": "p\nnode.session.auth.username = root"},
     "password"),
    ("iscsi", {"connection": "127.0.0.1", "iqn": "iqn.2003-01.org.x:t", "port": "3260;id"},
     "port"),
]


@pytest.mark.parametrize("verb", ["testStorageConnection", "connectStorageServer",
                                  "updateStorageConnection"])
def test_injection_through_connections_is_refused(target: Target, verb: str) -> None:
    """Every attempt is -32602 naming the field, and no tool ran with it: no
    mount, nothing created, storage unchanged."""
    for dom_type, params, field in INJECTIONS:
        conn = {"id": new_id(), **params}
        call: dict[str, Any]
        if verb == "connectStorageServer":
            call = {"domType": dom_type, "connectionParams": [conn]}
            path = f"connectionParams[0].{field}"
        else:
            call = {"domType": dom_type, "connection": conn}
            path = f"connection.{field}"
        response = target.rpc.request(verb, call)
        assert "error" in response, (verb, params, response)
        error = response["error"]
        assert error["code"] == -32602, (verb, params, response)
        assert error["data"]["field"] == path, (verb, params, error)
        assert path in error["message"]
        assert target.state() == target.baseline
        assert not PWNED.exists()


# Accepted by the schema: each reaches its tool as one argv element, never
# through a shell, so the metacharacters are just bytes of a name.
ARGV_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("nfs", {"connection": f"127.0.0.1:/x;touch${{IFS}}{PWNED}"}),
    ("nfs", {"connection": f"127.0.0.1:/$(touch${{IFS}}{PWNED})"}),
    ("posixfs", {"connection": f"/dev/null;touch {PWNED}", "vfs_type": "ext4"}),
    ("posixfs", {"connection": f"`touch {PWNED}`", "vfs_type": "ext4"}),
    ("posixfs", {"connection": "/dev/null", "vfs_type": "ext4", "mnt_options": "ro,noexec"}),
    ("localfs", {"connection": f"/nonexistent/$(touch {PWNED})"}),
    ("localfs", {"connection": f"/nonexistent/a b;touch {PWNED}"}),
]


def test_metacharacters_reach_tools_as_plain_arguments(target: Target) -> None:
    """A trial connection with shell metacharacters in its spec: the tool
    fails on the odd name (a storage error in the result), nothing runs."""
    for dom_type, params in ARGV_ONLY:
        result = target.rpc.call("testStorageConnection", domType=dom_type,
                                 connection={"id": new_id(), **params})
        assert result["reachable"] is False, (params, result)
        assert result["details"]["code"] in STORAGE_CODES, (params, result)
        assert target.state() == target.baseline
        assert not PWNED.exists(), params


@pytest.mark.parametrize("verb, params, field", [
    ("discoverSendTargets", {"connection": "-p"}, "connection"),
    ("discoverSendTargets", {"connection": "127.0.0.1 -o new"}, "connection"),
    ("discoverSendTargets", {"connection": "127.0.0.1", "port": -1}, "port"),
    ("getDeviceList", {"guids": ["-a"]}, "guids[0]"),
    ("getDeviceList", {"guids": ["3600;id"]}, "guids[0]"),
    ("getDeviceList", {"guids": ["36001405\n-f"]}, "guids[0]"),
    ("createStorageDomain", {"sdUUID": "SD", "domType": "iscsi", "name": "x",
                             "devices": ["-ff"]}, "devices[0]"),
    ("createStorageDomain", {"sdUUID": "SD", "domType": "iscsi", "name": "x",
                             "devices": ["/dev/sda;id"]}, "devices[0]"),
    ("createStorageDomain", {"sdUUID": "SD", "domType": "localfs", "name": "x\ny",
                             "connectionId": "CONN"}, "name"),
    ("createStorageDomain", {"sdUUID": "SD", "domType": "localfs", "name": "x\ud800",
                             "connectionId": "CONN"}, "name"),
    ("createStorageDomain", {"sdUUID": "SD\n", "domType": "localfs", "name": "x",
                             "connectionId": "CONN"}, "sdUUID"),
    # Metadata is KEY=VALUE lines: a line separator in a value must not
    # forge a key (CAP, BACKUP...) on the real domain.
    ("createStorageDomain", {"sdUUID": "SD", "domType": "localfs", "name": "x\u2029BACKUP=1",
                             "connectionId": "CONN"}, "name"),
    ("createVolume", {"jobUUID": "SD", "sdUUID": "REAL", "imgUUID": "SD", "volUUID": "SD",
                      "size": 1 << 20, "format": "raw", "preallocate": "sparse",
                      "description": "x\u2028CAP=999999999999"}, "description"),
    ("createVolume", {"jobUUID": "SD", "sdUUID": "REAL", "imgUUID": "SD", "volUUID": "SD",
                      "size": 1 << 20, "format": "raw", "preallocate": "sparse",
                      "description": "x\x85CTIME=0"}, "description"),
])
def test_injection_through_other_verbs_is_refused(target: Target, verb: str,
                                                  params: dict[str, Any], field: str) -> None:
    params = {k: (target.sd if v == "REAL" else
                  v.replace("SD", new_id()).replace("CONN", target.conn_id)
                  if isinstance(v, str) else v) for k, v in params.items()}
    response = target.rpc.request(verb, params)
    assert response.get("error", {}).get("code") == -32602, response
    assert response["error"]["data"]["field"] == field
    assert target.state() == target.baseline
    assert not PWNED.exists()


def test_log_has_no_traceback(target: Target) -> None:
    """Runs last in this file: nothing above made the agent log a traceback
    (every refusal or storage error is an expected error)."""
    log = target.agent.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
    assert "failed unexpectedly" not in log, log[-5000:]
