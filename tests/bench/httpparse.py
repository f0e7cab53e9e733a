"""The data listener's request parsing against h11 (PyPI, a test extra),
CPU only, in turns: the time to parse one upload's request head, and the
CPU per GiB of body that a parser adds beyond TLS when reads of 256 KiB
(the listener's TLS read size) go into a 4 MiB buffer: the listener
(rpc.httpconn) decrypts into that buffer itself, modelled here as one copy;
h11 takes each read into its own buffer and hands it back as a Data
event's bytes, which are then copied in.

    python -m tests.bench httpparse
"""

from __future__ import annotations

import time
from typing import Any

from rpc.httpconn import _parse_head
from tests.bench.common import median, save, table

GiB = 1 << 30
READ = 256 << 10
HEAD = (b"PUT /ovfstore/abcdefghijklmnopqrstuvwxyz0123456789 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:54322\r\nContent-Length: %d\r\nUser-Agent: python\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n")
HEADS = 20000
ROUNDS = 5


def _heads(parse: Any) -> float:
    """Microseconds per head."""
    head = HEAD % GiB
    start = time.perf_counter()
    for _ in range(HEADS):
        parse(head)
    return (time.perf_counter() - start) / HEADS * 1e6


def _h11_head(head: bytes) -> Any:
    import h11
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    return conn.next_event()


def _copy_body() -> float:
    """CPU seconds for a GiB copied read by read into the buffer."""
    chunk = bytes(READ)
    buf = memoryview(bytearray(4 << 20))
    start = time.process_time()
    pos = 0
    for _ in range(GiB // READ):
        buf[pos:pos + READ] = chunk
        pos = (pos + READ) % len(buf)
    return time.process_time() - start


def _h11_body() -> float:
    import h11
    chunk = bytes(READ)
    buf = memoryview(bytearray(4 << 20))
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD % GiB)
    conn.next_event()
    start = time.process_time()
    pos = 0
    for _ in range(GiB // READ):
        conn.receive_data(chunk)
        data = conn.next_event().data
        buf[pos:pos + len(data)] = data
        pos = (pos + len(data)) % len(buf)
    elapsed = time.process_time() - start
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    return elapsed


def run() -> dict[str, Any]:
    try:
        import h11
    except ImportError:
        return {"skipped": "h11 is not installed (pip install h11)"}
    out: dict[str, list[float]] = {"head_us_hand": [], "head_us_h11": [],
                                   "body_cpu_s_per_gib_copy": [], "body_cpu_s_per_gib_h11": []}
    for _ in range(ROUNDS):
        out["head_us_hand"].append(_heads(lambda h: _parse_head(h[:-2])))
        out["head_us_h11"].append(_heads(_h11_head))
        out["body_cpu_s_per_gib_copy"].append(_copy_body())
        out["body_cpu_s_per_gib_h11"].append(_h11_body())
    result = {"h11": h11.__version__, "rounds": ROUNDS, "runs": out,
              **{k: median(v) for k, v in out.items()}}
    save("httpparse", result)
    return result


def report(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    rows = [["request head, us each", r["head_us_hand"], r["head_us_h11"]],
            ["body beyond TLS, CPU s/GiB", r["body_cpu_s_per_gib_copy"],
             r["body_cpu_s_per_gib_h11"]]]
    return (f"median of {r['rounds']} rounds, h11 {r['h11']}\n"
            + table(rows, ["", "rpc.httpconn", "h11"]))
