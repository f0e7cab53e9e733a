"""The baseline for the ping benchmark: a bare aiohttp handler returning the
same body as the agent's ping, behind the same mutual TLS settings.

    python -m tests.bench.bare_server PKI_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from agent.config import ServerConfig
from rpc.server import ssl_context

BODY = b'{"jsonrpc": "2.0", "result": {}, "id": 1}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    pki, port = Path(sys.argv[1]), int(sys.argv[2])
    config = ServerConfig(host="127.0.0.1", port=port, ca_file=str(pki / "ca.pem"),
                          cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"))
    app = web.Application()
    app.add_routes([web.post("/jsonrpc", handle)])
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ssl_context(config),
                access_log=None, print=lambda *a: print("ready", flush=True), backlog=1024)


if __name__ == "__main__":
    main()
