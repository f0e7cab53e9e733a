"""Abuse of the HTTP edge of the real agent: malformed and oversized bodies,
deep nesting, huge batches, slow-loris clients, wrong methods and content
types, client certificates the agent must refuse.

What tests/integration/test_agent_process.py already covers is not repeated
here: a client without a certificate, one from another CA, plain HTTP, a
simple parse error, a 5 MiB body.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rpc.client import Client, client_ssl_context
from rpc.dispatch import MAX_BATCH
from rpc.server import BODY_TIMEOUT, IDLE_TIMEOUT
from tests.agentproc import AgentProcess, clean_agent

MiB = 1024 * 1024

# A client-side socket of one of these tests (which one is not found yet) is
# sometimes left to the garbage collector, and its ResourceWarning surfaces in
# a later test's teardown. It is the test client's, never the agent's: the
# agent's own state is checked by every test here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with clean_agent(tmp_path_factory.mktemp("abuse") / "state") as proc:
        yield proc


def tls(agent: AgentProcess) -> ssl.SSLContext:
    return agent.tls()


def _complete(response: bytes) -> bool:
    """A whole response with a Content-Length is in."""
    head, sep, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if sep else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def raw_exchange(agent: AgentProcess, data: bytes, *, timeout: float = 10,
                       ctx: ssl.SSLContext | None = None) -> bytes:
    """Send raw bytes over a fresh mTLS connection; what the agent sends back
    until its first response is complete, it closes the connection or
    `timeout` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port,
                                                   ssl=ctx or tls(agent))
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while not _complete(out) and (chunk := await reader.read(65536)):
                out += chunk
    except TimeoutError:
        pass
    finally:
        # No TLS close_notify dance with an agent that may have hung up: the
        # socket is closed now, never left to the garbage collector.
        writer.transport.abort()
    return out


def post(body: bytes, content_type: str = "application/json", **headers: str) -> bytes:
    head = [b"POST /jsonrpc HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
            f"Content-Length: {len(body)}".encode()]
    if content_type:
        head.append(f"Content-Type: {content_type}".encode())
    head += [f"{k}: {v}".encode() for k, v in headers.items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    assert response.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), response[:200]
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> Any:
    _, _, body = response.partition(b"\r\n\r\n")
    assert b"Traceback" not in body
    return json.loads(body)


async def ping_ok(agent: AgentProcess) -> None:
    async with Client.for_dev(agent.state_dir, port=agent.port, timeout=10) as c:
        assert await c.call("ping") == {}


# ---- malformed bodies -----------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    (b"", -32700), (b"{", -32700), (b"[", -32700), (b'{"jsonrpc": "2.0"', -32700),
    (b"nul", -32700), (b"\xff\xfe{}", -32700), (b'\xef\xbb\xbf{"jsonrpc": "2.0"}', -32700),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": NaN}', -32700),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "params": {"a": Infinity}}', -32700),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": 1' + b"9" * 5000 + b"}", -32600),
    (b"[1, 2,]", -32700), (b"'single'", -32700), (b"\x00" * 100, -32700),
    (b"null", -32600), (b"123", -32600), (b'"ping"', -32600), (b"[]", -32600),
    (b"{}", -32600), (b'{"jsonrpc": "1.0", "method": "ping", "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": 7, "id": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": {"a": 1}}', -32600),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "params": "x"}', -32600),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "extra": 1}', -32600),
    (b'{"jsonrpc": "2.0", "method": "rpc.nosuch", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "__init__", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "rpc.discover", "id": 1, "params": {"peer": 1}}', -32602),
    (b'{"jsonrpc": "2.0", "method": "rpc.discover", "id": 1, "params": [1]}', -32602),
    (b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "params": {"peer": "x"}}', -32602),
])
async def test_malformed_json_gets_a_clean_error(agent: AgentProcess, body: bytes,
                                                 code: int) -> None:
    response = await raw_exchange(agent, post(body))
    assert status_of(response) == 200
    answer = json_of(response)
    assert answer["error"]["code"] == code, answer
    if code == -32602:
        assert answer["error"]["data"]["field"] in ("peer", "params"), answer
    await ping_ok(agent)


@pytest.mark.parametrize("nest", [
    lambda n: "[" * n + "]" * n,
    lambda n: '{"a":' * n + "1" + "}" * n,
    lambda n: '{"jsonrpc": "2.0", "method": "ping", "id": 1, "params": {"a": '
              + "[" * n + "]" * n + "}}",
], ids=["arrays", "objects", "in-params"])
async def test_deep_nesting_is_a_parse_error(agent: AgentProcess,
                                            nest: Callable[[int], str]) -> None:
    start = time.monotonic()
    response = await raw_exchange(agent, post(nest(100_000).encode()))
    assert time.monotonic() - start < 5
    assert json_of(response)["error"]["code"] == -32700
    await ping_ok(agent)


# ---- sizes ------------------------------------------------------------------------

async def test_declared_oversized_body_is_refused_before_it_is_read(agent: AgentProcess) -> None:
    """413 as soon as the headers are in: the agent does not wait for (or
    read) the 100 MiB the client announced."""
    head = (b"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(100 * MiB).encode() + b"\r\n\r\n")
    start = time.monotonic()
    response = await raw_exchange(agent, head + b"[" * 1024, timeout=5)
    assert status_of(response) == 413
    assert time.monotonic() - start < 5
    await ping_ok(agent)


async def test_huge_header_is_refused(agent: AgentProcess) -> None:
    response = await raw_exchange(agent, post(b"{}", **{"X-Big": "a" * 100_000}))
    assert response == b"" or status_of(response) in (400, 431)
    many = {f"X-H{i}": "v" for i in range(500)}
    response = await raw_exchange(agent, post(b"{}", **many))
    assert response == b"" or status_of(response) in (400, 431)
    await ping_ok(agent)


async def test_batch_is_bounded(agent: AgentProcess) -> None:
    async with Client.for_dev(agent.state_dir, port=agent.port, timeout=60) as c:
        big = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(10_000)]
        status, answer = await c.post_raw(json.dumps(big))
        assert status == 200 and answer["error"]["code"] == -32600, answer
        assert str(MAX_BATCH) in answer["error"]["data"]
        ok = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(MAX_BATCH)]
        start = time.monotonic()
        status, answers = await c.post_raw(json.dumps(ok))
        assert status == 200 and len(answers) == MAX_BATCH
        assert all(a["result"] == {} for a in answers)
        assert time.monotonic() - start < 10
        # a batch of only notifications has no response body
        notes = [{"jsonrpc": "2.0", "method": "ping"} for _ in range(100)]
        status, answer = await c.post_raw(json.dumps(notes))
        assert status == 204 and answer is None


# ---- methods and content types --------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", ""])
async def test_wrong_content_type_is_refused(agent: AgentProcess, content_type: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    response = await raw_exchange(agent, post(body, content_type))
    assert status_of(response) == 415
    response = await raw_exchange(agent, post(body, "application/json; charset=utf-8"))
    assert json_of(response)["result"] == {}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_jsonrpc(agent: AgentProcess, method: str) -> None:
    request = (f"{method} /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    assert status_of(await raw_exchange(agent, request)) == 405


async def test_unknown_paths(agent: AgentProcess) -> None:
    for path in ("/", "/jsonrpc/", "/jsonrpc/../health/x", "/%2e%2e/etc/passwd", "/admin"):
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                   "\r\n").encode()
        assert status_of(await raw_exchange(agent, request)) in (404, 400), path
    await ping_ok(agent)


async def test_websocket_oversized_and_binary_messages(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls(agent))) as s:
        async with s.ws_connect(f"{agent.url}/jsonrpc/ws") as ws:
            await ws.send_bytes(b"\x00\x01")
            msg = await ws.receive(timeout=10)
            assert json.loads(msg.data)["error"]["code"] == -32700
            await ws.send_str("{" * 100_000)
            msg = await ws.receive(timeout=10)
            assert json.loads(msg.data)["error"]["code"] == -32700
            await ws.send_str("x" * (5 * MiB))
            msg = await ws.receive(timeout=10)
            # The agent closes with 1009; the client may see the connection
            # drop (1006) while its own 5 MiB are still on the way.
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR), msg
            assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                     aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
    await ping_ok(agent)


async def test_websocket_flood_is_answered_in_bounded_steps(agent: AgentProcess) -> None:
    """5000 calls sent at once on one WebSocket: every one answered, and
    another client is served meanwhile (the agent reads the flood only as
    fast as it answers it)."""
    n = 5000
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls(agent))) as s:
        async with s.ws_connect(f"{agent.url}/jsonrpc/ws", max_msg_size=0) as ws:
            for i in range(n):
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": i,
                                              "method": "getStats"}))
            start = time.monotonic()
            await ping_ok(agent)
            assert time.monotonic() - start < 5
            ids: set[int] = set()
            async with asyncio.timeout(60):
                while len(ids) < n:
                    msg = await ws.receive()
                    data = json.loads(msg.data)
                    if "id" in data:
                        assert "result" in data, data
                        ids.add(data["id"])
            assert ids == set(range(n))


# ---- slow clients -----------------------------------------------------------------------

async def _slow(agent: AgentProcess, prefix: bytes, trickle: bytes, interval: float,
                start: float) -> tuple[float, bytes]:
    """Send `prefix`, then `trickle` one byte per `interval`, until the agent
    closes the connection; returns (seconds since start, what it sent back)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=tls(agent))
    got = b""
    try:
        writer.write(prefix)
        await writer.drain()
        i = 0
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), interval)
            except TimeoutError:
                if trickle:
                    writer.write(trickle[i % len(trickle):i % len(trickle) + 1])
                    i += 1
                    await writer.drain()
                continue
            if not chunk:
                break
            got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        # No TLS close_notify dance with an agent that may have hung up: the
        # socket is closed now, never left to the garbage collector.
        writer.transport.abort()
    return time.monotonic() - start, got


async def test_slow_loris_clients_are_cut_off_while_others_are_served(agent: AgentProcess) -> None:
    """Connections that trickle their headers, send nothing at all, or
    trickle a body are closed after the idle / body timeout; meanwhile a
    normal client's pings keep a low latency."""
    start = time.monotonic()
    header_loris = b"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body_loris = (b"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100000\r\n\r\n[")
    tasks = ([asyncio.create_task(_slow(agent, header_loris, b"X-Slow: a\r\n", 0.5, start))
              for _ in range(60)]
             + [asyncio.create_task(_slow(agent, b"", b"", 1.0, start)) for _ in range(10)]
             + [asyncio.create_task(_slow(agent, body_loris, b"1,", 0.5, start))
                for _ in range(10)])
    latencies = []
    async with Client.for_dev(agent.state_dir, port=agent.port, timeout=10) as c:
        async with asyncio.timeout(max(IDLE_TIMEOUT, BODY_TIMEOUT) + 30):
            while not all(t.done() for t in tasks):
                t0 = time.monotonic()
                assert await c.call("ping") == {}
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.2)
    results = [t.result() for t in tasks]
    header, idle, body = results[:60], results[60:70], results[70:]
    for closed_at, got in header + idle:
        assert IDLE_TIMEOUT - 1 <= closed_at <= IDLE_TIMEOUT + 15, closed_at
        assert got == b"", got[:200]
    for closed_at, got in body:
        assert BODY_TIMEOUT - 1 <= closed_at <= BODY_TIMEOUT + 20, closed_at
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.5, latencies
    assert latencies[-1] < 3, latencies


# ---- client certificates --------------------------------------------------------------

def _issue(pki: Path, out: Path, *, cn: str, days: tuple[int, int],
           usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH) -> ssl.SSLContext:
    """A client certificate signed by the agent's own CA, valid from
    now+days[0] to now+days[1]; the context that presents it."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return client_ssl_context(pki / "ca.pem", out / "c.pem", out / "c.key")


async def _refused(agent: AgentProcess, ctx: ssl.SSLContext) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        async with Client(agent.url, ctx, timeout=10) as c:
            await c.call("ping")


async def test_expired_and_future_client_certificates_are_refused(agent: AgentProcess,
                                                                  tmp_path: Path) -> None:
    assert await _works(agent, _issue(agent.pki, tmp_path / "ok", cn="ok", days=(-1, 1)))
    await _refused(agent, _issue(agent.pki, tmp_path / "old", cn="old", days=(-10, -1)))
    await _refused(agent, _issue(agent.pki, tmp_path / "new", cn="new", days=(1, 10)))


async def test_server_certificate_as_client_certificate_is_refused(agent: AgentProcess,
                                                                   tmp_path: Path) -> None:
    """Signed by the right CA but for TLS servers only (extended key usage)."""
    pki = agent.pki
    await _refused(agent, client_ssl_context(pki / "ca.pem", pki / "server.pem",
                                             pki / "server.key"))
    await _refused(agent, _issue(pki, tmp_path / "srv", cn="srv", days=(-1, 1),
                                 usage=ExtendedKeyUsageOID.SERVER_AUTH))


async def _works(agent: AgentProcess, ctx: ssl.SSLContext) -> bool:
    async with Client(agent.url, ctx, timeout=10) as c:
        return bool(await c.call("ping") == {})
