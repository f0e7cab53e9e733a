"""The unmasked-frame check in front of aiohttp's WebSocket reader
(rpc.server._MaskedFramesOnly): frame boundaries followed across any split
of the stream into reads."""

import os
import random
import struct

import pytest
from aiohttp import WSCloseCode

from rpc.server import _MaskedFramesOnly


def frame(payload: bytes, masked: bool = True) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        length = bytes([n | bit])
    elif n < 65536:
        length = bytes([126 | bit]) + struct.pack("!H", n)
    else:
        length = bytes([127 | bit]) + struct.pack("!Q", n)
    return bytes([0x81]) + length + (os.urandom(4) + payload if masked else payload)


class Parser:
    def __init__(self) -> None:
        self.data = b""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Queue:
    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc


def split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 40)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


STREAM = b"".join(frame(os.urandom(n)) for n in (0, 1, 125, 126, 200, 65535, 65536, 70000))


@pytest.mark.parametrize("seed", range(20))
def test_masked_frames_pass_whatever_the_reads(seed):
    parser, queue = Parser(), Queue()
    check = _MaskedFramesOnly(parser, queue)
    for chunk in split(STREAM, random.Random(seed)):
        assert check.feed_data(chunk) == (False, b"")
    assert parser.data == STREAM and queue.exc is None


@pytest.mark.parametrize("seed", range(20))
def test_an_unmasked_frame_fails_the_connection_where_it_starts(seed):
    parser, queue = Parser(), Queue()
    check = _MaskedFramesOnly(parser, queue)
    bad = frame(b"x" * 300, masked=False)
    stream = STREAM + bad + frame(b"after")
    results = [check.feed_data(c) for c in split(stream, random.Random(seed))]
    assert (True, b"") in results
    # every byte before the unmasked frame reached the reader; of it, at
    # most its first byte (a read ending there: the mask bit is in the second)
    assert parser.data in (STREAM, STREAM + bad[:1])
    assert queue.exc is not None and queue.exc.code == WSCloseCode.PROTOCOL_ERROR
    assert check.feed_data(frame(b"more")) == (True, b"")


def test_unmasked_frame_in_one_read():
    parser, queue = Parser(), Queue()
    check = _MaskedFramesOnly(parser, queue)
    first = frame(b"ok")
    assert check.feed_data(first + frame(b"bad", masked=False)) == (True, b"")
    assert parser.data == first


def test_unmasked_frame_whose_header_is_cut_after_one_byte():
    parser, queue = Parser(), Queue()
    check = _MaskedFramesOnly(parser, queue)
    first, bad = frame(b"ok"), frame(b"bad", masked=False)
    assert check.feed_data(first + bad[:1]) == (False, b"")
    assert check.feed_data(bad[1:]) == (True, b"")
    assert parser.data == first + bad[:1] and queue.exc is not None
