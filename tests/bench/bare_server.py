"""The baselines of the benchmarks: a bare aiohttp app behind the same mutual
TLS settings as the agent.

- POST /jsonrpc returns the same body as the agent's ping (ping benchmark).
- PUT /sink reads the request body the way the agent's OVF upload does
  (aiohttp's StreamReader, in chunks of up to 1 MiB) and discards it: the
  most an upload over this transport can reach (ovf benchmark).

    python -m tests.bench.bare_server PKI_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from agent.config import ServerConfig
from rpc.ovfroutes import CHUNK
from rpc.server import ssl_context

BODY = b'{"jsonrpc": "2.0", "result": {}, "id": 1}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        received += len(chunk)
    return web.json_response({"size": received})


def main() -> None:
    pki, port = Path(sys.argv[1]), int(sys.argv[2])
    config = ServerConfig(host="127.0.0.1", port=port, ca_file=str(pki / "ca.pem"),
                          cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"))
    app = web.Application()
    app.add_routes([web.post("/jsonrpc", handle), web.put("/sink", sink)])
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ssl_context(config),
                access_log=None, print=lambda *a: print("ready", flush=True), backlog=1024)


if __name__ == "__main__":
    main()
