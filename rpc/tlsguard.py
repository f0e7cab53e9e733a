"""TLS handshakes of both listeners (the main port and the OVF data
listener): bounded per peer address, and refusals logged.

A handshake holds nothing but a socket: it runs outside the listeners'
connection slots, within its own short deadline (server.handshake_timeout),
and at most server.max_peer_handshakes of them run at once per peer address
(more are closed at once). So connections that never complete a handshake
(idle, plain TCP, slow) cannot keep a client with a certificate waiting
(issue 22, item 2).

A refused handshake (no client certificate, another CA, an old protocol,
not TLS at all, too slow) is logged with its reason once per peer address
and reason per LOG_INTERVAL; the ones not logged are counted in the next
line (issue 16).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("rpc.tls")

LOG_INTERVAL = 60.0
# (peer, reason) pairs remembered for the rate limit; past this the oldest
# are forgotten (a few hundred bytes each).
MAX_REMEMBERED = 4096


def refusal_reason(e: BaseException, timeout: float) -> str:
    """Why a handshake failed, in a few words (OpenSSL's reason code)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"client certificate refused: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e).lower().replace("_", " ")
    if isinstance(e, TimeoutError):
        return f"no TLS handshake within {timeout:g} s"
    return "closed during the TLS handshake"


class HandshakeGuard:
    """One listener's handshakes in progress, per peer address, and its
    rate-limited refusal log."""

    def __init__(self, listener: str, timeout: float, per_peer: int, *,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.listener = listener
        self.timeout = timeout
        self.per_peer = per_peer
        self.interval = interval
        self.clock = clock
        self._running: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], float] = {}
        self._unlogged: Counter[tuple[str, str]] = Counter()

    def admit(self, peer: str) -> bool:
        """Count a handshake from peer; False (and logged) if it has too many."""
        if self._running[peer] >= self.per_peer:
            self.refused(peer, f"more than {self.per_peer} TLS handshakes at once "
                               "from this address")
            return False
        self._running[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self._running[peer] -= 1
        if self._running[peer] <= 0:
            del self._running[peer]

    def running(self, peer: str) -> int:
        return self._running[peer]

    def failed(self, peer: str, e: BaseException) -> None:
        self.refused(peer, refusal_reason(e, self.timeout))

    def refused(self, peer: str, reason: str) -> None:
        key = (peer, reason)
        now = self.clock()
        last = self._logged.get(key)
        if last is not None and now - last < self.interval:
            self._unlogged[key] += 1
            return
        if len(self._logged) >= MAX_REMEMBERED:
            self._forget(now)
        self._logged[key] = now
        more = self._unlogged.pop(key, 0)
        log.warning("%s: TLS handshake from %s refused: %s%s", self.listener, peer, reason,
                    f" ({more} more since the last report)" if more else "")

    def _forget(self, now: float) -> None:
        for key, at in list(self._logged.items()):
            if now - at >= self.interval:
                del self._logged[key]
                self._unlogged.pop(key, None)
        while len(self._logged) >= MAX_REMEMBERED:
            key = next(iter(self._logged))       # the oldest logged
            del self._logged[key]
            self._unlogged.pop(key, None)
