"""The JSON-RPC and HTTP edge held to the letter, through the real agent:
JSON-RPC 2.0 batches (section 6 and the section 7 examples' shapes) on POST
/jsonrpc and on the WebSocket, ids outside a double's range, replies that
are always strict JSON, a Range header of 5000 digits on both OVF ports,
and unmasked WebSocket frames from a client (RFC 6455 section 5.1)."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import hashlib
import http.client
import io
import json
import math
import os
import re
import socket
import ssl
import struct
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpc.client import Client
from tests.agentproc import AgentProcess, clean_agent

# aiohttp's WebSocket client over TLS sometimes leaves its socket to the
# garbage collector (as in test_http_abuse); a ResourceWarning of the test
# client, surfacing in a later teardown, never of the agent.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def strict_json(text: str | bytes) -> Any:
    """json.loads that refuses NaN and Infinity: what a strict reader sees."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a reply: not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with clean_agent(tmp_path_factory.mktemp("edge") / "state") as proc:
        yield proc


def tls(agent: AgentProcess) -> ssl.SSLContext:
    return agent.tls()


async def post(agent: AgentProcess, body: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls(agent))) as s:
        async with s.post(f"{agent.url}/jsonrpc", data=body.encode(),
                          headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.text()


async def over_ws(agent: AgentProcess, bodies: list[str], expect: int) -> list[Any]:
    """Each body sent on one WebSocket; the `expect` answers (not event
    notifications) that come, plus any other that comes before the answer
    to a ping sent after them."""
    answers: list[Any] = []

    async def until(rid: str, count: int) -> None:
        seen = False
        while not (seen and len(answers) >= count):
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = strict_json(msg.data)
            if isinstance(data, dict) and "method" in data and "id" not in data:
                continue        # an event notification
            if isinstance(data, dict) and data.get("id") == rid:
                seen = True
            else:
                answers.append(data)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls(agent))) as s:
        async with s.ws_connect(f"{agent.url}/jsonrpc/ws") as ws:
            for body in bodies:
                await ws.send_str(body)
            async with asyncio.timeout(20):
                # calls on one WebSocket run concurrently: a first ping and
                # the expected answers, then a second ping catches extras
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "ping", "id": "e1"}))
                await until("e1", expect)
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "ping", "id": "e2"}))
                await until("e2", expect)
    return answers


def without_data(answer: Any) -> Any:
    if isinstance(answer, list):
        return [without_data(a) for a in answer]
    if isinstance(answer, dict) and "error" in answer:
        return dict(answer, error={k: v for k, v in answer["error"].items() if k != "data"})
    return answer


INVALID = {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
           "id": None}
NOTES = json.dumps([{"jsonrpc": "2.0", "method": "ping"},
                    {"jsonrpc": "2.0", "method": "getStats"}])
MIXED = json.dumps([
    {"jsonrpc": "2.0", "method": "ping", "id": "1"},
    {"jsonrpc": "2.0", "method": "ping"},
    {"foo": "boo"},
    {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
    {"jsonrpc": "2.0", "method": "ping", "params": {"x": 1}, "id": "6"},
    {"jsonrpc": "2.0", "method": "ping", "id": 9},
])
# The shapes of the JSON-RPC 2.0 section 7 examples with the agent's verbs.
BATCHES = [
    ("[]", INVALID),
    ("[1]", [INVALID]),
    ("[1,2,3]", [INVALID, INVALID, INVALID]),
    (MIXED, [
        {"jsonrpc": "2.0", "result": {}, "id": "1"},
        INVALID,
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"},
         "id": "5"},
        {"jsonrpc": "2.0", "error": {"code": -32602,
                                     "message": "Invalid params: x: unknown parameter"},
         "id": "6"},
        {"jsonrpc": "2.0", "result": {}, "id": 9}]),
]


async def test_batches_as_jsonrpc_2_0_says_over_http(agent: AgentProcess) -> None:
    for body, expected in BATCHES:
        status, text = await post(agent, body)
        assert status == 200
        assert without_data(strict_json(text)) == expected, body
    status, text = await post(agent, NOTES)
    assert (status, text) == (204, "")


async def test_batches_as_jsonrpc_2_0_says_over_websocket(agent: AgentProcess) -> None:
    answers = await over_ws(agent, [NOTES, *(body for body, _ in BATCHES)], len(BATCHES))
    key = json.dumps
    assert sorted(key(without_data(a)) for a in answers) == \
        sorted(key(expected) for _, expected in BATCHES)


IDS = ["1e999", "-1e999", "1E400", "9" * 5000, "-" + "1" * 5000, "1" + "0" * 400 + ".0"]


@pytest.mark.parametrize("rid", IDS, ids=lambda r: r[:8])
async def test_ids_outside_double_range_are_invalid_requests(agent: AgentProcess,
                                                             rid: str) -> None:
    body = f'{{"jsonrpc": "2.0", "method": "ping", "id": {rid}}}'
    status, text = await post(agent, body)
    assert status == 200
    assert without_data(strict_json(text)) == INVALID
    [answer] = await over_ws(agent, [body], 1)
    assert without_data(answer) == INVALID
    # in a batch, beside a valid call that is answered
    status, text = await post(agent, f'[{body}, {{"jsonrpc": "2.0", "method": "ping", "id": 2}}]')
    assert without_data(strict_json(text)) == [INVALID, {"jsonrpc": "2.0", "result": {},
                                                          "id": 2}]


# ---- unmasked WebSocket frames --------------------------------------------------------

def frame(payload: bytes, *, masked: bool, opcode: int = 1) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    length = (bytes([n | bit]) if n < 126
              else bytes([126 | bit]) + struct.pack("!H", n) if n < 65536
              else bytes([127 | bit]) + struct.pack("!Q", n))
    if not masked:
        return bytes([0x80 | opcode]) + length + payload
    key = os.urandom(4)
    return (bytes([0x80 | opcode]) + length + key
            + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))


async def raw_websocket(agent: AgentProcess, first: bytes = b""
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A WebSocket opened by hand (`first` sent right behind the upgrade
    request); what came after the 101 response's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=tls(agent))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /jsonrpc/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode() + first)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer, b""


async def frames_until_close(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """The server's frames (opcode, payload) until it closes the connection."""
    out: list[tuple[int, bytes]] = []
    async with asyncio.timeout(10):
        while True:
            try:
                b0, b1 = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return out
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            out.append((b0 & 0x0F, await reader.readexactly(n)))


PING = json.dumps({"jsonrpc": "2.0", "method": "ping", "id": 1}).encode()


@pytest.mark.parametrize("with_upgrade", [False, True], ids=["later", "with-upgrade"])
async def test_unmasked_client_frame_closes_the_websocket(agent: AgentProcess,
                                                          with_upgrade: bool) -> None:
    """RFC 6455 5.1: the server MUST close the connection on an unmasked
    frame from a client. Closed with 1002, the call in it not answered."""
    bad = frame(PING, masked=False)
    reader, writer, _ = await raw_websocket(agent, bad if with_upgrade else b"")
    try:
        if not with_upgrade:
            # a masked call first: answered
            writer.write(frame(PING, masked=True))
            async with asyncio.timeout(10):
                while True:
                    b0, n = await reader.readexactly(2)
                    data = await reader.readexactly(n)
                    if b0 & 0x0F == 1 and strict_json(data).get("id") == 1:
                        break
            writer.write(bad)
        frames = await frames_until_close(reader)
    finally:
        writer.transport.abort()
    assert not [p for op, p in frames if op == 1 and "id" in strict_json(p)], frames
    closes = [p for op, p in frames if op == 8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == 1002, frames


async def test_masked_frames_of_every_size_are_read(agent: AgentProcess) -> None:
    """The check follows frame boundaries: short, 16-bit and 64-bit lengths,
    sent in one write, are all answered."""
    reader, writer, _ = await raw_websocket(agent)
    pad = " " * 70_000
    calls = [json.dumps({"jsonrpc": "2.0", "method": "ping", "id": i}) + pad[:size]
             for i, size in enumerate([0, 200, 70_000])]
    ids = []
    try:
        writer.write(b"".join(frame(c.encode(), masked=True) for c in calls))
        async with asyncio.timeout(10):
            while len(ids) < len(calls):
                b0, n = await reader.readexactly(2)
                if n == 126:
                    n = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(n)
                if b0 & 0x0F == 1 and "id" in (answer := strict_json(data)):
                    assert answer["result"] == {}, answer
                    ids.append(answer["id"])
    finally:
        writer.transport.abort()
    assert sorted(ids) == [0, 1, 2]


# ---- headers with absurd numbers (OVF store, both ports) ---------------------------------

@pytest.fixture
async def store(agent: AgentProcess, tmp_path: Path) -> AsyncIterator[tuple[str, int, bytes]]:
    """(sdUUID, OVF data port, the stored tar) of a localfs domain."""
    root = tmp_path / "data"
    root.mkdir()
    conn, sd = str(uuid.uuid4()), str(uuid.uuid4())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"{uuid.uuid4()}.ovf")
        data = b"<ovf/>" * 1000
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    body = buf.getvalue()
    async with Client.for_dev(agent.state_dir, port=agent.port) as c:
        [st] = await c.call("connectStorageServer", domType="localfs",
                            connectionParams=[{"id": conn, "connection": str(root)}])
        assert st["status"] == 0
        await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="edge",
                     connectionId=conn)
        t = await c.call("uploadOvfTar", sdUUID=sd, size=len(body),
                         sha256=hashlib.sha256(body).hexdigest())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls(agent))) as s:
            async with s.put(t["url"], data=body) as r:
                assert r.status == 200, await r.text()
        yield sd, int(t["url"].split(":")[2].split("/")[0]), body
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs",
                     connectionParams=[{"id": conn, "connection": str(root)}])


async def raw_get(agent: AgentProcess, port: int, head: str) -> tuple[int, bytes]:
    """One raw request over mTLS; (status, body) of the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls(agent))
    try:
        writer.write(head.encode())
        async with asyncio.timeout(10):
            reply = await reader.read()
    except ConnectionError:
        reply = b""
    finally:
        writer.transport.abort()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("port_of", ["main", "data"])
async def test_absurd_numbers_in_headers(agent: AgentProcess, store: tuple[str, int, bytes],
                                         port_of: str) -> None:
    """A Range of 5000 digits (Python's int() stops at 4300) is a range that
    cannot be satisfied (416), not a 500 with a traceback; so are digits of
    other scripts and more than 19 digits. A 5000-digit Content-Length is a
    400. Sane ranges keep working."""
    sd, data_port, body = store
    port = agent.port if port_of == "main" else data_port

    def head(*lines: str) -> str:
        return "\r\n".join([f"GET /ovfstore/{sd} HTTP/1.1", "Host: 127.0.0.1",
                            "Connection: close", *lines, "", ""])

    for rng in ["bytes=0-" + "9" * 5000, "bytes=" + "1" * 5000 + "-", "bytes=-" + "7" * 5000,
                "bytes=0-" + "9" * 20, "bytes=\u0661-\u0662"]:
        status, _ = await raw_get(agent, port, head(f"Range: {rng}"))
        assert status == 416, (rng[:20], status)
    status, _ = await raw_get(agent, port, head("Content-Length: " + "9" * 5000))
    assert status == 400
    assert await raw_get(agent, port, head("Range: bytes=0-" + "9" * 19)) == (206, body)
    assert await raw_get(agent, port, head("Range: bytes=10-19")) == (206, body[10:20])
    assert "Traceback" not in agent.log_path.read_text(errors="replace")


# ---- fuzzing: ids and headers with hostile numbers -----------------------------------

FUZZ = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "20")), deadline=None,
                database=None, derandomize=os.environ.get("CI", "") in ("1", "true"),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Number-like texts: in and out of a double's range, past int()'s 4300
# digits, JSON's non-numbers (NaN, Infinity) and things that only look like
# numbers.
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(300, 6000).map(lambda n: "9" * n),
    st.integers(300, 6000).map(lambda n: "-1" + "0" * n),
    st.tuples(st.integers(-9, 9), st.integers(300, 100_000)).map(lambda t: f"{t[0]}e{t[1]}"),
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E+400",
                     "0x10", "+1", "01", "1.", ".5", "1_0", "\u0661", "true", "[]", "{}",
                     '"x"', "null", ""]),
)


def id_outcome(token: str) -> str:
    """What the agent must answer a request whose id is `token`: "echo"
    (the id given back), "invalid" (-32600, id null) or "parse" (-32700)."""
    try:
        # an integer as a double: past its range (or int()'s digits) infinite
        value = json.loads(token, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)),
                           parse_int=lambda t: float(t))
    except (ValueError, RecursionError):
        return "parse"
    if isinstance(value, bool) or not isinstance(value, str | int | float | None):
        return "invalid"
    if isinstance(value, float) and not math.isfinite(value):
        return "invalid"
    return "echo"


def test_ids_fuzzed_answers_are_strict_json(agent: AgentProcess) -> None:
    ctx = tls(agent)

    @FUZZ
    @given(NUMBERS)
    def run(token: str) -> None:
        body = f'{{"jsonrpc": "2.0", "method": "ping", "id": {token}}}'
        for batch in (False, True):
            conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=ctx,
                                               timeout=30)
            try:
                conn.request("POST", "/jsonrpc",
                             body=(f"[{body}]" if batch else body).encode(),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                status, text = r.status, r.read().decode()
            finally:
                conn.close()
            assert status == 200, (status, text[:300])
            answer = strict_json(text)
            expect = id_outcome(token)
            if batch and expect != "parse":
                [answer] = answer
            if expect == "echo":
                assert answer["result"] == {} and answer["id"] == json.loads(token), answer
            else:
                code = -32700 if expect == "parse" else -32600
                assert answer["error"]["code"] == code and answer["id"] is None, answer

    run()


def http_exchange(ctx: ssl.SSLContext, port: int, head: str) -> tuple[int, bytes, str]:
    """One raw request over mTLS (blocking): status, body, Content-Type.
    Reads the reply by its Content-Length (the data listener lingers until
    the client closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(head.encode("utf-8"))
        reply = b""
        while b"\r\n\r\n" not in reply and (data := s.recv(65536)):
            reply += data
        head_bytes, _, body = reply.partition(b"\r\n\r\n")
        msg = email.parser.BytesHeaderParser().parsebytes(head_bytes.partition(b"\r\n")[2])
        length = int(msg.get("Content-Length", "0"))
        while len(body) < length and (data := s.recv(65536)):
            body += data
    return int(head_bytes.split()[1]), body, msg.get("Content-Type", "")


async def test_headers_fuzzed(agent: AgentProcess, store: tuple[str, int, bytes]) -> None:
    """Range and Content-Length built from hostile numbers, on GET
    /ovfstore of both ports and on POST /jsonrpc: never a 500, every JSON
    reply strict JSON, a satisfiable range served exactly."""
    sd, data_port, body = store
    ctx = tls(agent)
    ranges = st.one_of(
        st.tuples(NUMBERS, NUMBERS).map(lambda t: f"bytes={t[0]}-{t[1]}"),
        NUMBERS.map(lambda n: f"bytes={n}-"), NUMBERS.map(lambda n: f"bytes=-{n}"),
        NUMBERS.map(lambda n: f"bytes=0-{n}, 5-{n}"), NUMBERS)

    @FUZZ
    @given(rng=ranges, length=NUMBERS, main=st.booleans())
    def run(rng: str, length: str, main: bool) -> None:
        port = agent.port if main else data_port
        get = (f"GET /ovfstore/{sd} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Range: {rng}\r\n\r\n")
        status, reply, ctype = http_exchange(ctx, port, get)
        assert status in (200, 206, 400, 416), (status, reply[:300])
        m = re.fullmatch(r"bytes=([0-9]{1,19})-([0-9]{1,19})", rng)
        if m and int(m.group(1)) <= int(m.group(2)) and int(m.group(1)) < len(body):
            assert (status, reply) == (206, body[int(m.group(1)):int(m.group(2)) + 1])
        post = (f"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
        if re.fullmatch(r"[0-9]{1,7}", length) and int(length) <= 4 * 1024 * 1024:
            post += " " * int(length)     # the body it announces (else: 30 s for it)
        if main:
            status, reply, ctype = http_exchange(ctx, agent.port, post)
            assert status in (200, 400, 413), (status, reply[:300])
        if "json" in ctype:
            strict_json(reply)

    run()
    log = agent.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]


async def test_client_gone_in_the_middle_of_a_body(agent: AgentProcess) -> None:
    """A client that closes after part of its JSON-RPC body (found by the
    header fuzzing) is logged in one line, not as a traceback."""
    _, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=tls(agent))
    writer.write(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n[1,")
    await writer.drain()
    # a ping on another connection, so that the agent has most likely read
    # this head before the abort (if not, the log line below never comes)
    async with Client.for_dev(agent.state_dir, port=agent.port) as c:
        assert await c.call("ping") == {}
    writer.transport.abort()
    deadline = asyncio.get_running_loop().time() + 10
    while "connection lost while reading the request body" not in (
            log := agent.log_path.read_text(errors="replace")):
        assert asyncio.get_running_loop().time() < deadline, log[-2000:]
        await asyncio.sleep(0.05)
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]
