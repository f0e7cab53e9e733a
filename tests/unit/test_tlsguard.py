"""HandshakeGuard: per-address admission and the rate-limited refusal log."""

import logging
import ssl

from rpc.tlsguard import HandshakeGuard, refusal_reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "rpc.tls"]


def test_refusals_logged_once_per_address_and_reason_per_interval(caplog):
    clock = Clock()
    guard = HandshakeGuard("main port", 5.0, 4, interval=60.0, clock=clock)
    caplog.set_level(logging.INFO)
    for _ in range(5):
        guard.failed("10.0.0.1", TimeoutError())
    guard.failed("10.0.0.2", TimeoutError())
    guard.refused("10.0.0.1", "unsupported protocol")
    assert lines(caplog) == [
        "main port: TLS handshake from 10.0.0.1 refused: no TLS handshake within 5 s",
        "main port: TLS handshake from 10.0.0.2 refused: no TLS handshake within 5 s",
        "main port: TLS handshake from 10.0.0.1 refused: unsupported protocol"]
    clock.now += 59
    guard.failed("10.0.0.1", TimeoutError())
    assert len(lines(caplog)) == 3
    clock.now += 1
    guard.failed("10.0.0.1", TimeoutError())
    assert lines(caplog)[-1] == ("main port: TLS handshake from 10.0.0.1 refused: no TLS "
                                 "handshake within 5 s (5 more since the last report)")


def test_handshakes_per_address_are_bounded(caplog):
    guard = HandshakeGuard("OVF data port", 5.0, 2)
    assert guard.admit("a") and guard.admit("a") and guard.admit("b")
    assert not guard.admit("a")
    guard.release("a")
    assert guard.admit("a")
    assert guard.running("a") == 2 and guard.running("b") == 1
    guard.release("b")
    assert guard.running("b") == 0
    assert "more than 2 TLS handshakes at once" in lines(caplog)[0]


def test_reasons():
    e = ssl.SSLError(1, "x")
    e.reason = "UNSUPPORTED_PROTOCOL"
    assert refusal_reason(e, 5) == "unsupported protocol"
    assert refusal_reason(ConnectionResetError(), 5) == "closed during the TLS handshake"
    assert refusal_reason(TimeoutError(), 2.5) == "no TLS handshake within 2.5 s"
