"""A lean HTTPS load generator with client certificates (a process of its own).

    python -m tests.bench.loadgen URL BODY_FILE CA CERT KEY CONCURRENCY SECONDS

Each of CONCURRENCY connections sends the same POST again and again
(HTTP/1.1 keep-alive) for SECONDS; prints one JSON line: requests, errors,
elapsed, latencies p50/p99 in ms. Raw asyncio streams, not an HTTP client
library, so the generator costs as little CPU per request as possible.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from urllib.parse import urlsplit

from rpc.client import client_ssl_context


def post_request(host: str, path: str, body: bytes) -> bytes:
    """One keep-alive HTTP/1.1 POST of a JSON body."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> tuple[bytes, bytes]:
    """Send one request, read its response: (status code, body). The agent
    answers with a Content-Length (never chunked)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def worker(host: str, port: int, ctx: ssl.SSLContext, request: bytes, until: float,
                 lat: list[float], errors: list[str]) -> int:
    n = 0
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        while time.perf_counter() < until:
            t = time.perf_counter()
            status, _ = await exchange(reader, writer, request)
            lat.append(time.perf_counter() - t)
            if status != b"200":
                errors.append(status.decode())
            n += 1
    finally:
        writer.close()
    return n


async def main(url: str, body: bytes, ca: str, cert: str, key: str, conc: int,
               seconds: float) -> dict[str, object]:
    u = urlsplit(url)
    ctx = client_ssl_context(ca, cert, key)
    request = post_request(u.hostname or "", u.path, body)
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    until = start + seconds
    counts = await asyncio.gather(*(worker(u.hostname or "", u.port or 443, ctx, request,
                                           until, lat, errors) for _ in range(conc)),
                                  return_exceptions=True)
    elapsed = time.perf_counter() - start
    lat.sort()
    failures = [repr(c) for c in counts if isinstance(c, BaseException)]
    done = sum(c for c in counts if isinstance(c, int))
    return {"requests": done, "errors": len(errors) + len(failures),
            "elapsed": elapsed, "rps": done / elapsed,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
            "failures": failures[:3]}


if __name__ == "__main__":
    url, body_file, ca, cert, key, conc, secs = sys.argv[1:8]
    with open(body_file, "rb") as f:
        body = f.read()
    print(json.dumps(asyncio.run(main(url, body, ca, cert, key, int(conc), float(secs)))))
