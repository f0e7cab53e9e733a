"""hostagentd: the agent process.

    hostagentd [--config FILE] [--show-config]
    hostagentd --dev --state-dir DIR [--port N]

Start-up: configuration, logging, (dev) PKI, the agent's services, the
listener; READY=1 once it is bound. SIGTERM/SIGINT: STOPPING=1, stop
accepting, give running jobs the grace period, exit 0; during the start,
the start is cut short and the agent stops, never ready.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# aiohttp makes two client TLS contexts as it is imported, each reading the
# system's CA bundle: 0.05 CPU-s of every agent start here (0.34 -> 0.29 s
# for `import agent.daemon`, medians of 8; the crash tests restart the
# agent hundreds of times). The agent serves TLS with its own CA and never
# uses those contexts: they are made without the bundle, and the variable
# is put back.
_CA_BUNDLE = os.environ.get("SSL_CERT_FILE")
os.environ["SSL_CERT_FILE"] = os.devnull
from aiohttp import web

if _CA_BUNDLE is None:
    del os.environ["SSL_CERT_FILE"]
else:
    os.environ["SSL_CERT_FILE"] = _CA_BUNDLE

from agent import __version__, logs
from agent import config as configmod
from agent.context import Agent
from agent.gctune import collect_quietly, tune_gc
from agent.pki import ensure_dev_pki
from agent.sdnotify import Notifier
from storage.fileio import StateDamaged

log = logging.getLogger("agent.daemon")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hostagentd", description="hostagent storage agent")
    p.add_argument("--config", type=Path, default=configmod.DEFAULT_CONFIG_FILE,
                   help="configuration file (conf.d/*.toml beside it are drop-ins)")
    p.add_argument("--show-config", action="store_true",
                   help="print the effective configuration and exit")
    p.add_argument("--dev", action="store_true",
                   help="dev mode: 127.0.0.1, generated dev CA and certificates, "
                        "state under --state-dir")
    p.add_argument("--state-dir", type=Path, help="dev mode: state and storage directory")
    p.add_argument("--port", type=int, help="listening port (default 54321)")
    p.add_argument("--enable-test-verbs", action="store_true",
                   help="add the self-test verbs (testStepJob, ...) that try jobs without "
                        "touching storage; for development, not for a production host")
    p.add_argument("--version", action="version", version=f"hostagentd {__version__}")
    args = p.parse_args(argv)
    if args.dev and args.state_dir is None:
        p.error("--dev needs --state-dir DIR")
    if args.state_dir is not None and not args.dev:
        p.error("--state-dir is for --dev; set storage.state_dir in the configuration")
    return args


def load_config(args: argparse.Namespace) -> configmod.Config:
    overrides: dict[str, Any] = {}
    if args.dev:
        overrides = configmod.dev_overrides(args.state_dir, args.port or 54321)
        # several dev agents may run side by side: the system picks the port
        overrides["ovf"] = {"data_port": 0}
    elif args.port is not None:
        overrides = {"server": {"port": args.port}}
    if args.enable_test_verbs:
        overrides["debug"] = {"test_verbs": True}
    # In dev mode the system config file is not read unless named explicitly:
    # a developer's agent must not pick up a production host's settings.
    path = args.config
    # argparse hands over its default object itself: any other is --config FILE,
    # which must exist (a typo must not start the agent on defaults)
    if path is not configmod.DEFAULT_CONFIG_FILE and not path.is_file():
        raise configmod.ConfigError(f"--config {path}: no such file")
    if args.dev and path == configmod.DEFAULT_CONFIG_FILE:
        path = args.state_dir / "hostagent.toml"
    return configmod.load(path, overrides)


async def serve(config: configmod.Config, notifier: Notifier) -> None:
    # Imported here: the verb table pulls in every storage module.
    import rpc.verbs  # noqa: F401
    from rpc import ovfroutes
    from rpc.dispatch import Dispatcher
    from rpc.ovfdata import DataListener
    from rpc.server import TlsSite, make_app, ssl_context
    from rpc.table import TABLE
    from rpc.tlsguard import HandshakeGuard

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    agent = Agent.create(config)
    if not await start_or_stop(agent, notifier, stop):
        return
    dispatcher = Dispatcher(agent, TABLE.enabled(config))
    app = make_app(agent, dispatcher, ovfroutes.routes(),
                   idle_timeout=config.server.idle_timeout,
                   body_timeout=config.server.body_timeout)
    runner = web.AppRunner(app, access_log=None,
                           shutdown_timeout=config.server.shutdown_timeout)
    await runner.setup()
    server = config.server
    tls = ssl_context(server) if server.tls else None
    site: web.TCPSite
    if tls is not None:
        guard = HandshakeGuard("main port", server.handshake_timeout, server.max_peer_handshakes)
        site = TlsSite(runner, server.host, server.port, tls, guard, backlog=1024,
                       reuse_address=True)
    else:
        site = web.TCPSite(runner, server.host, server.port, backlog=1024, reuse_address=True)
    data = DataListener(agent, tls) if config.ovf.data_port >= 0 else None
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await agent.stop()
        raise SystemExit(f"hostagentd: cannot listen on {server.host}:{server.port}: {e}") \
            from None
    if data is not None:
        try:
            await data.start()
        except OSError as e:
            await runner.cleanup()
            await agent.stop()
            raise SystemExit(f"hostagentd: cannot listen on {server.host}:"
                             f"{config.ovf.data_port} (ovf.data_port): {e}") from None
    tune_gc()
    scheme = "https" if tls else "http"
    log.info("hostagent %s listening on %s://%s:%d (%d verbs)", __version__, scheme,
             server.host, server.port, len(dispatcher.verbs))
    notifier.notify("READY=1", f"STATUS=listening on {server.host}:{server.port}")
    watchdog = asyncio.create_task(notifier.watchdog(), name="watchdog")
    collector = asyncio.create_task(collect_quietly(
        agent.metrics.calls_answered, done=agent.metrics.gc_full.observe), name="gc")

    await stop.wait()
    log.info("Stopping")
    notifier.notify("STOPPING=1")
    # Stop accepting first, then let jobs finish (or cancel them), then close
    # what remains of the connections.
    await site.stop()
    if data is not None:
        await data.stop()
    await agent.stop()
    watchdog.cancel()
    collector.cancel()
    await runner.cleanup()
    log.info("Stopped")


async def start_or_stop(agent: Agent, notifier: Notifier, stop: asyncio.Event) -> bool:
    """agent.start(), unless a stop comes first: False once the agent is
    stopped, never ready. `systemctl stop` or `restart` while the start
    waits on storage (up to storage.connect_wait for connections, then
    lockspace joins and interrupted jobs' recoveries) is served at once,
    not after it. What the start leaves half done is what a crash leaves:
    connections are re-checked, recoveries run again, at the next start."""
    extender = asyncio.create_task(notifier.extend_start(), name="start-timeout")
    starting = asyncio.create_task(agent.start(), name="start")
    stopping = asyncio.create_task(stop.wait(), name="stop-request")
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        extender.cancel()
        stopping.cancel()
    if starting.done():
        starting.result()       # a start that failed ends the process, as ever
        return True
    log.info("Stopping before the start ended")
    notifier.notify("STOPPING=1")
    starting.cancel()
    await asyncio.wait([starting])
    if not starting.cancelled() and starting.exception() is not None:
        log.error("The start, cut short, failed", exc_info=starting.exception())
    await agent.stop()
    log.info("Stopped")
    return False


LOCK_FILE = "hostagentd.lock"


def lock_state_dir(state_dir: Path) -> int:
    """flock a file in the state directory for the life of the process (the
    fd is close-on-exec: children do not keep it), so that two agents never
    share one state directory; its text is the holder's pid. Raises
    SystemExit naming the holder if another agent has it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(f"hostagentd: the state directory {state_dir} is in use by another "
                         f"agent (pid {holder}); each agent needs its own (--state-dir in dev "
                         "mode, storage.state_dir otherwise)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unreadable_tls_files(server: configmod.ServerConfig) -> list[str]:
    """'key path: reason' for each TLS file of the listener that cannot be read."""
    bad = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(server, key)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            bad.append(f"server.{key} {path}: {e.strerror}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except configmod.ConfigError as e:
        print(f"hostagentd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(config.to_toml(), end="")
        return 0
    logs.setup(config.logging.level, config.logging.levels)
    try:
        lock_fd = lock_state_dir(config.state_dir)
    except OSError as e:
        print(f"hostagentd: cannot lock the state directory {config.state_dir}: {e}",
              file=sys.stderr)
        return 1
    try:
        if config.dev:
            pki = config.state_dir / "pki"
            made = ensure_dev_pki(pki)
            if made:
                log.info("Made dev certificates in %s: %s", pki, ", ".join(made))
        bad = unreadable_tls_files(config.server) if config.server.tls else []
        if bad:
            print("hostagentd: cannot read the listener's TLS files: " + "; ".join(bad),
                  file=sys.stderr)
            return 1
        try:
            asyncio.run(serve(config, Notifier()))
        except (FileNotFoundError, PermissionError, StateDamaged) as e:
            log.error("Cannot start: %s", e)
            return 1
        return 0
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(main())
