"""TLS of the real agent as a scanner nobody here wrote sees it: sslyze's
check against Mozilla's "intermediate" profile on every listener (the
JSON-RPC port and the OVF data listener), and the suites it must refuse."""

from __future__ import annotations

import datetime
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from agent.pki import ensure_dev_pki
from rpc.client import Client, client_ssl_context
from tests.agentproc import ROOT, AgentProcess
from tests.conftest import missing

pytestmark = pytest.mark.root

# sslyze pins cryptography below the version the agent uses: it gets a venv
# of its own, made once and kept (inside .venv, so `make clean` removes it).
SSLYZE_VENV = ROOT / ".venv" / "tools" / "sslyze"
SSLYZE_SPEC = "sslyze>=6.1,<7"


def _sslyze() -> Path:
    exe = SSLYZE_VENV / "bin" / "sslyze"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SSLYZE_VENV)],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([str(SSLYZE_VENV / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", SSLYZE_SPEC],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        missing(f"cannot install {SSLYZE_SPEC} from PyPI: {e}")
    return exe


def _data_port(agent: AgentProcess) -> int:
    m = re.search(r"OVF data listener on https://127\.0\.0\.1:(\d+)", agent.log())
    assert m, agent.log()
    return int(m.group(1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_listener_passes_sslyze_mozilla_intermediate(agent: AgentProcess) -> None:
    sslyze = _sslyze()
    pki = agent.pki
    for port in (agent.port, _data_port(agent)):
        r = subprocess.run([str(sslyze), "--mozilla_config", "intermediate",
                            "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"),
                            "--certinfo_ca_file", str(pki / "ca.pem"), f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert f"127.0.0.1:{port}: OK - Compliant." in r.stdout, r.stdout[-6000:]


def _tls12_context(agent: AgentProcess, ciphers: str) -> ssl.SSLContext:
    pki = agent.pki
    ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize("ciphers", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA",
                                     "ECDHE-ECDSA-AES256-SHA384"])
async def test_tls12_cbc_suites_are_refused(agent: AgentProcess, ciphers: str) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        async with Client(agent.url, _tls12_context(agent, ciphers), timeout=10) as c:
            await c.call("ping")


@pytest.mark.parametrize("ciphers", ["ECDHE-ECDSA-AES128-GCM-SHA256",
                                     "ECDHE-ECDSA-AES256-GCM-SHA384",
                                     "ECDHE-ECDSA-CHACHA20-POLY1305"])
async def test_tls12_aead_suites_and_tls13_work(agent: AgentProcess, ciphers: str) -> None:
    async with Client(agent.url, _tls12_context(agent, ciphers), timeout=10) as c:
        assert await c.call("ping") == {}
    async with agent.client() as c:
        assert await c.call("ping") == {}


def test_cli_verifies_strictly(agent: AgentProcess) -> None:
    """hostagent-client's context has VERIFY_X509_STRICT (Python 3.13's
    default) and still reaches the dev agent."""
    assert client_ssl_context(agent.pki / "ca.pem", agent.pki / "client.pem",
                              agent.pki / "client.key").verify_flags & ssl.VERIFY_X509_STRICT
    r = subprocess.run([sys.executable, "-m", "rpc.cli", "--dev", str(agent.state_dir),
                        "--port", str(agent.port), "ping"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{}"


async def test_start_renews_near_expiry_pki_and_old_clients_keep_working(
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A dev PKI made 340 days ago (all of it ends within 30 days): the next
    start renews it; a client still holding the old CA and its old client
    certificate reaches the agent, verifying strictly."""
    state = tmp_path / "state"
    ensure_dev_pki(state / "pki", now=datetime.datetime.now(datetime.UTC)
                   - datetime.timedelta(days=340))
    old = tmp_path / "old-pki"
    shutil.copytree(state / "pki", old)
    agent = agent_factory(state)
    assert "Made dev certificates" in agent.log() and "ca, server, client" in agent.log()
    assert (state / "pki" / "server.pem").read_bytes() != (old / "server.pem").read_bytes()
    async with Client(agent.url, client_ssl_context(old / "ca.pem", old / "client.pem",
                                                    old / "client.key"), timeout=10) as c:
        assert await c.call("ping") == {}
    async with agent.client() as c:
        assert await c.call("ping") == {}
