"""A small blocking NBD client for qemu-nbd's UNIX socket: the data path of
disk transfers (storage/transfers.py), called from the data listener's
worker threads, never from the event loop.

Fixed newstyle handshake, NBD_OPT_GO, simple replies only (no structured
replies: extents come from `qemu-img map` on the same socket), one request
in flight. Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import socket
import struct

from storage.nbd import NbdError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_FLAG_NO_HOLE = 2

TX_READ_ONLY = 2
TX_SEND_WRITE_ZEROES = 64

# qemu-nbd refuses requests over 32 MiB (NBD_MAX_BUFFER_SIZE)
MAX_REQUEST = 32 * 1024 * 1024
# one WRITE_ZEROES request: qemu takes up to 2 GiB - 4 KiB
MAX_ZERO = (1 << 31) - 4096


class NbdClient:
    """One connection to an export. Not thread safe: one thread at a time."""

    def __init__(self, path: str, export: str = "", timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._handle = 0
        try:
            self.sock.connect(path)
            self.size, self.flags = self._handshake(export)
        except (OSError, struct.error) as e:
            self.sock.close()
            raise NbdError(op="connect", reason=str(e)) from None
        except BaseException:
            self.sock.close()
            raise

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TX_READ_ONLY)

    def close(self) -> None:
        try:
            self._send_request(CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- handshake ---------------------------------------------------------------------

    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            got = self.sock.recv_into(view[pos:])
            if not got:
                raise NbdError(op="receive", reason="server closed the connection")
            pos += got

    def _handshake(self, export: str) -> tuple[int, int]:
        if self._recv_exactly(8) != NBDMAGIC or self._recv_exactly(8) != IHAVEOPT:
            raise NbdError(op="handshake", reason="not a newstyle NBD server")
        (server_flags,) = struct.unpack("!H", self._recv_exactly(2))
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(op="handshake", reason="server is not fixed newstyle")
        self.sock.sendall(struct.pack("!I", FLAG_FIXED_NEWSTYLE
                                      | (server_flags & FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack("!I", len(name)) + name + struct.pack("!H", 0)
        self.sock.sendall(IHAVEOPT + struct.pack("!II", OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            magic, opt, rtype, length = struct.unpack("!QIII", self._recv_exactly(20))
            payload = self._recv_exactly(length)
            if magic != OPT_REPLY_MAGIC or opt != OPT_GO:
                raise NbdError(op="handshake", reason="bad option reply")
            if rtype & REP_ERR_BIT:
                raise NbdError(op="handshake",
                               reason=payload.decode(errors="replace") or f"error {rtype:#x}")
            if rtype == REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack("!H", payload[:2])
                if info == INFO_EXPORT:
                    size, flags = struct.unpack("!QH", payload[2:12])
            elif rtype == REP_ACK:
                break
        if size is None or flags is None:
            raise NbdError(op="handshake", reason="no export information")
        return size, flags

    # ---- transmission --------------------------------------------------------------------

    def _send_request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._handle += 1
        self.sock.sendall(struct.pack("!IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle,
                                      offset, length))
        return self._handle

    def _reply(self, handle: int, op: str) -> None:
        magic, error, got = struct.unpack("!IIQ", self._recv_exactly(16))
        if magic != SIMPLE_REPLY_MAGIC or got != handle:
            raise NbdError(op=op, reason="unexpected reply")
        if error:
            raise NbdError(op=op, reason=f"errno {error}")

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError(op="request", reason=f"{length} bytes at {offset} are past the "
                                                 f"end ({self.size})")

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill view with the export's bytes at offset."""
        self._check(offset, len(view))
        for i in range(0, len(view), MAX_REQUEST):
            part = view[i:i + MAX_REQUEST]
            handle = self._send_request(CMD_READ, offset + i, len(part))
            self._reply(handle, "read")
            self._recv_into(part)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        self._check(offset, len(view))
        for i in range(0, len(view), MAX_REQUEST):
            part = view[i:i + MAX_REQUEST]
            handle = self._send_request(CMD_WRITE, offset + i, len(part))
            self.sock.sendall(part)
            self._reply(handle, "write")

    def zero(self, offset: int, length: int) -> None:
        """Zero the range, deallocating where the image can (a hole reads as zeroes)."""
        self._check(offset, length)
        if not self.flags & TX_SEND_WRITE_ZEROES:
            buf = bytes(min(length, 1024 * 1024))
            done = 0
            while done < length:
                n = min(len(buf), length - done)
                self.write(offset + done, memoryview(buf)[:n])
                done += n
            return
        done = 0
        while done < length:
            n = min(MAX_ZERO, length - done)
            handle = self._send_request(CMD_WRITE_ZEROES, offset + done, n)
            self._reply(handle, "zero")
            done += n

    def flush(self) -> None:
        handle = self._send_request(CMD_FLUSH, 0, 0)
        self._reply(handle, "flush")
