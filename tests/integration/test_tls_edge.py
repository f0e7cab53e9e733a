"""TLS handshakes on both listeners of the real agent (the main port and the
OVF data listener): outside the connection slots, within
server.handshake_timeout, at most server.max_peer_handshakes at once per
address, and refused ones logged with their reason once per address
(issue 22 item 2, issue 16).

Idle connections come from other loopback addresses (127.0.0.2...): Linux
routes all of 127/8 to lo, so each is its own peer address."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rpc.client import Client, client_ssl_context
from tests.agentproc import AgentProcess
from tests.integration.test_edge_strict import store, tls  # noqa: F401 - the fixture
from tests.integration.test_http_abuse import _issue

HANDSHAKE_TIMEOUT = 2.0
PER_PEER = 8

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> Iterator[AgentProcess]:
    conf = tmp_path / "state" / "hostagent.toml"
    conf.parent.mkdir()
    conf.write_text(f"[server]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n"
                    f"max_peer_handshakes = {PER_PEER}\n")
    proc = agent_factory(tmp_path / "state")
    yield proc
    assert "Traceback" not in proc.log_path.read_text(errors="replace")


class Idle:
    """Plain TCP connections that send nothing, from one source address."""

    def __init__(self, port: int, source: str) -> None:
        self.port = port
        self.source = source
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []

    async def open(self, n: int) -> Idle:
        for _ in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", self.port,
                                                 local_addr=(self.source, 0))
            self.readers.append(r)
            self.writers.append(w)
        return self

    async def closed_after(self, timeout: float) -> list[float]:
        """Seconds until the agent closed each connection (from now)."""
        start = time.monotonic()

        async def one(r: asyncio.StreamReader) -> float:
            async with asyncio.timeout(timeout):
                while await r.read(1024):
                    pass
            return time.monotonic() - start
        return list(await asyncio.gather(*(one(r) for r in self.readers)))

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()


async def log_has(agent: AgentProcess, text: str, timeout: float = 10) -> str:
    """The agent's log once it has `text` (the log is written by the agent
    as it goes: polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while text not in (log := agent.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log[-3000:]}"
        await asyncio.sleep(0.05)
    return log


async def timed_ping(agent: AgentProcess) -> float:
    start = time.monotonic()
    async with Client.for_dev(agent.state_dir, port=agent.port, timeout=30) as c:
        assert await c.call("ping") == {}
    return time.monotonic() - start


async def timed_get(agent: AgentProcess, data_port: int, sd: str, body: bytes) -> float:
    start = time.monotonic()
    conn = aiohttp.TCPConnector(ssl=tls(agent))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(f"https://127.0.0.1:{data_port}/ovfstore/{sd}",
                         timeout=aiohttp.ClientTimeout(total=30)) as r:
            assert (r.status, await r.read()) == (200, body)
    return time.monotonic() - start


async def timed_upload(agent: AgentProcess, sd: str, body: bytes) -> float:
    start = time.monotonic()
    async with Client.for_dev(agent.state_dir, port=agent.port, timeout=30) as c:
        t = await c.call("uploadOvfTar", sdUUID=sd, size=len(body),
                         sha256=hashlib.sha256(body).hexdigest())
    conn = aiohttp.TCPConnector(ssl=tls(agent))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.put(t["url"], data=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
            assert r.status == 200, await r.text()
    return time.monotonic() - start


async def test_idle_connections_do_not_block_ovf_transfers(
        agent: AgentProcess, store: tuple[str, int, bytes]) -> None:  # noqa: F811
    """Issue 22.2: 20 plain TCP connections that send nothing used to take
    the data listener's 16 slots for 30 s each. Now they hold no slot: a
    client with a certificate is answered at once, on both ports; the idle
    ones are closed after handshake_timeout."""
    sd, data_port, body = store
    idle = [await Idle(data_port, f"127.0.0.{2 + i // PER_PEER}").open(1)
            for i in range(20)]
    idle += [await Idle(agent.port, f"127.0.0.{2 + i // PER_PEER}").open(1)
             for i in range(20)]
    try:
        assert await timed_get(agent, data_port, sd, body) < 2
        assert await timed_upload(agent, sd, body) < 2
        assert await timed_ping(agent) < 2
        closed = [t for i in idle for t in await i.closed_after(HANDSHAKE_TIMEOUT + 10)]
        assert max(closed) < HANDSHAKE_TIMEOUT + 2, closed
    finally:
        for i in idle:
            i.close()
    log = await log_has(agent, f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s")
    for listener in ("main port", "OVF data port"):
        assert f"{listener}: TLS handshake from 127.0.0.2 refused: no TLS handshake" in log


@pytest.mark.parametrize("which", ["main", "data"])
async def test_handshakes_per_address_are_bounded(agent: AgentProcess,
                                                  store: tuple[str, int, bytes],  # noqa: F811
                                                  which: str) -> None:
    """Past max_peer_handshakes at once from one address, a new connection
    is closed at once (and logged); other addresses are served."""
    sd, data_port, body = store
    port = agent.port if which == "main" else data_port
    held = await Idle(port, "127.0.0.9").open(PER_PEER)
    extra = await Idle(port, "127.0.0.9").open(3)
    try:
        closed = await extra.closed_after(HANDSHAKE_TIMEOUT / 2)
        assert max(closed) < HANDSHAKE_TIMEOUT / 2, closed
        assert await timed_ping(agent) < 2
        assert await timed_get(agent, data_port, sd, body) < 2
    finally:
        held.close()
        extra.close()
    name = "main port" if which == "main" else "OVF data port"
    log = await log_has(agent, f"{name}: TLS handshake from 127.0.0.9 refused: more than "
                               f"{PER_PEER} TLS handshakes at once")
    assert log.count(f"{name}: TLS handshake from 127.0.0.9 refused: more than") == 1


def _old_protocol(agent: AgentProcess) -> ssl.SSLContext:
    ctx = client_ssl_context(agent.pki / "ca.pem", agent.pki / "client.pem",
                             agent.pki / "client.key")
    with warnings.catch_warnings():
        # the point of this client: an old protocol the agent must refuse
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _no_certificate(agent: AgentProcess) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(agent.pki / "ca.pem")
    return ctx


def _other_ca(agent: AgentProcess, tmp_path: Path) -> ssl.SSLContext:
    other = tmp_path / "other-pki"
    other.mkdir()
    # a CA of its own, which signs the client's certificate
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    (other / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (other / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    ctx = _issue(other, tmp_path / "other-client", cn="intruder", days=(-1, 1))
    # it trusts the agent's server certificate: the refusal is the agent's
    ctx.load_verify_locations(agent.pki / "ca.pem")
    return ctx


async def _attempt(port: int, ctx: ssl.SSLContext | None, source: str) -> None:
    """One connection that the agent refuses; for TLS 1.3 the client sees
    the refusal only when it reads."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             local_addr=(source, 0),
                                             server_hostname="127.0.0.1" if ctx else None)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            got = await r.read(65536)
        assert not got.startswith(b"HTTP/1.1 200"), got
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        w.transport.abort()


async def test_tls_refusals_are_logged_once_per_address(
        agent: AgentProcess, store: tuple[str, int, bytes], tmp_path: Path) -> None:  # noqa: F811
    """No client certificate, a certificate of another CA, TLS 1.1, plain
    HTTP: each refused, on both ports, with its reason in one log line per
    address however often it is tried (rate-limited)."""
    _, data_port, _ = store
    cases = [("127.0.0.21", _no_certificate(agent), "peer did not return a certificate"),
             ("127.0.0.22", _other_ca(agent, tmp_path), "client certificate refused"),
             ("127.0.0.23", _old_protocol(agent), "unsupported protocol"),
             ("127.0.0.24", None, "http request")]
    for port, name in ((agent.port, "main port"), (data_port, "OVF data port")):
        for source, ctx, reason in cases:
            for _ in range(3):
                await _attempt(port, ctx, source)
            # the data port asks for a certificate without requiring one (a
            # transfer url's ticket is its credential): a request without one
            # is refused (403) and logged the same way
            what = ("request" if port == data_port and reason.startswith("peer did not")
                    else "TLS handshake")
            line_text = f"{name}: {what} from {source} refused"
            log = await log_has(agent, line_text)
            lines = [line for line in log.splitlines() if line_text in line]
            assert len(lines) == 1, lines
            assert reason in lines[0].lower(), lines
    assert await timed_ping(agent) < 2


SOAK_IDLE = 200          # per listener
SOAK_SECONDS = 12.0      # a few handshake_timeouts: the idle ones are cut and come back


async def hold_idle(port: int, source: str, stop: asyncio.Event, held: list[int]) -> int:
    """Keep one idle unauthenticated connection open from source until stop:
    when the agent cuts it, open another. How many were opened."""
    opened = 0
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port,
                                                     local_addr=(source, 0))
            except ConnectionError:
                continue
            opened += 1
            held[0] += 1
            try:
                cut = asyncio.create_task(r.read())
                await asyncio.wait({cut, stopping}, return_when=asyncio.FIRST_COMPLETED)
                cut.cancel()
                await asyncio.gather(cut, return_exceptions=True)
            finally:
                held[0] -= 1
                w.transport.abort()
    finally:
        stopping.cancel()
    return opened


@pytest.mark.slow
async def test_soak_idle_unauthenticated_connections(
        agent: AgentProcess, store: tuple[str, int, bytes]) -> None:  # noqa: F811
    """200 idle unauthenticated connections held on each listener (reopened
    as the agent cuts them) while pings, OVF uploads and downloads run:
    every authenticated request is answered within its normal time."""
    sd, data_port, body = store
    baseline = {"ping": [await timed_ping(agent) for _ in range(5)],
                "get": [await timed_get(agent, data_port, sd, body) for _ in range(3)],
                "upload": [await timed_upload(agent, sd, body) for _ in range(3)]}
    stop = asyncio.Event()
    held = [0]
    holders = [asyncio.create_task(hold_idle(port, f"127.0.1.{1 + i // PER_PEER}", stop, held))
               for port in (agent.port, data_port) for i in range(SOAK_IDLE)]
    latencies: dict[str, list[float]] = {"ping": [], "get": [], "upload": []}
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while held[0] < 2 * SOAK_IDLE:
            assert time.monotonic() < deadline, held
            await asyncio.sleep(0.05)
        end = time.monotonic() + SOAK_SECONDS

        async def pings() -> None:
            while time.monotonic() < end:
                latencies["ping"].append(await timed_ping(agent))
                samples.append(held[0])

        async def transfers() -> None:
            while time.monotonic() < end:
                latencies["upload"].append(await timed_upload(agent, sd, body))
                latencies["get"].append(await timed_get(agent, data_port, sd, body))

        await asyncio.gather(pings(), transfers())
    finally:
        stop.set()
        opened = await asyncio.gather(*holders)
    print(f"baseline {baseline}\nunder load: held {min(samples)}..{max(samples)}, "
          f"opened {sum(opened)}, " + ", ".join(
              f"{k} n={len(v)} max={max(v):.3f} s" for k, v in latencies.items()))
    # the idle ones were really held, and cut and reopened along the way.
    # Opened together, they are cut together (every handshake timeout):
    # a sample taken while the 400 reconnect sees a dip (284 in a run with
    # 853 samples), so most samples, not each, find them held
    samples.sort()
    assert samples[len(samples) // 2] >= 1.5 * SOAK_IDLE, samples
    assert samples[0] >= SOAK_IDLE / 2, samples
    assert sum(opened) >= 3 * 2 * SOAK_IDLE
    assert len(latencies["ping"]) >= 20 and len(latencies["upload"]) >= 5
    for kind, values in latencies.items():
        assert max(values) < 2.0, (kind, sorted(values)[-5:])
