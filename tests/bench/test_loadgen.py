"""The load generator's lean websocket client (bench/loadgen.py), in process.

The parser is fed server frames split at every byte boundary, with 7-, 16-
and 64-bit lengths, fragments, compressed messages, pings and a close; bad
frames (masked by the server, a reserved opcode, RSV bits nobody negotiated,
a continuation with nothing to continue) must fail the socket with 1002. The
handshake is then run against a real websockets server: a refusal has the
exception class name the old client reported (the generator's failure
reason), and messages go both ways with and without permessage-deflate.
"""
import asyncio
import zlib

import pytest
from websockets.asyncio.server import serve
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.utils import apply_mask

from bench import loadgen
from bench.loadgen import CLOSING, OPEN, WebSocket


class Transport:
    def __init__(self):
        self.written = bytearray()
        self.closed = self.aborted = False

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def server_frame(payload: bytes, opcode=1, fin=True, rsv1=False, masked=False) -> bytes:
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if masked:
        return head + b"abcd" + apply_mask(payload, b"abcd")
    return head + payload


def client_frames(data: bytes):
    """(first byte, unmasked payload) of every frame the client wrote; each must be masked."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "a client frame must be masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        mask, pos = data[pos:pos + 4], pos + 4
        out.append((b0, apply_mask(data[pos:pos + n], mask)))
        pos += n
    return out


def open_socket(deflate=None):
    """A socket past its handshake on a fake transport: what it delivered and how it ended."""
    got, ends = [], []
    ws = WebSocket(b"", "key", None, got.append, lambda clean, exc: ends.append((clean, exc)))
    ws.connection_made(Transport())
    ws.transport.written.clear()  # the (empty) request
    ws.state = OPEN
    ws.deflate = deflate
    return ws, got, ends


def compressed(text: str, compressor) -> bytes:
    data = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


async def test_frames_split_at_every_byte_boundary_with_every_length_encoding():
    texts = ["short", "é" * 200, "x" * 70_000, ""]  # 7-bit, 16-bit (400 bytes), 64-bit lengths, empty
    stream = b"".join(server_frame(t.encode()) for t in texts) + server_frame(b"\x00\x01", opcode=2)
    stream += server_frame(b"hel", fin=False) + server_frame(b"p", opcode=9) + server_frame(b"lo", opcode=0)
    expected = [*texts, b"\x00\x01", "hello"]
    for cut in range(len(stream) + 1):
        if 0 < cut < len(stream) - 200 and cut % 97 and cut > 500:
            continue  # every boundary in the headers and the small frames, a sample inside the big one
        ws, got, ends = open_socket()
        ws.data_received(stream[:cut])
        ws.data_received(stream[cut:])
        assert got == expected, cut
        assert client_frames(bytes(ws.transport.written)) == [(0x8A, b"p")]  # the ping's pong, masked
        assert ws.state == OPEN and not ends

    ws, got, _ = open_socket()  # and one byte at a time
    for i in range(len(stream)):
        ws.data_received(stream[i:i + 1])
    assert got == expected and not ws.buf


async def test_close_is_echoed_and_ends_the_socket_cleanly():
    ws, got, ends = open_socket()
    ws.data_received(server_frame(b"a") + server_frame((1001).to_bytes(2, "big") + b"bye", opcode=8) + server_frame(b"late"))
    assert got == ["a"]  # nothing after the close frame is read
    assert client_frames(bytes(ws.transport.written)) == [(0x88, (1001).to_bytes(2, "big"))]
    assert ws.state == CLOSING and ends == [(True, None)] and ws.ended.done()
    with pytest.raises(loadgen.SocketClosed):
        await ws.send("after close")

    ws, _, ends = open_socket()
    ws.data_received(server_frame((1011).to_bytes(2, "big"), opcode=8))
    assert ends == [(False, None)]  # not 1000/1001: the old client's ConnectionClosedError


@pytest.mark.parametrize("frame", [
    server_frame(b"masked", masked=True),
    server_frame(b"x", opcode=3),  # reserved opcode
    server_frame(b"x", rsv1=True),  # RSV1 without permessage-deflate
    server_frame(b"x", opcode=0),  # a continuation with no message
    server_frame(b"p" * 126, opcode=9),  # a control frame over 125 bytes
    server_frame(b"p", opcode=9, fin=False),  # a fragmented control frame
    server_frame(b"a", fin=False) + server_frame(b"b"),  # a new message inside a fragmented one
])
async def test_protocol_errors_fail_the_socket_with_1002(frame):
    ws, got, ends = open_socket()
    ws.data_received(frame + server_frame(b"after"))
    assert got == [] and ends == [(False, None)]
    assert client_frames(bytes(ws.transport.written)) == [(0x88, (1002).to_bytes(2, "big"))]
    assert ws.transport.closed


async def test_invalid_utf8_and_on_message_errors_fail_the_socket():
    ws, got, ends = open_socket()
    ws.data_received(server_frame(b"\xff\xfe"))
    assert got == [] and client_frames(bytes(ws.transport.written)) == [(0x88, (1007).to_bytes(2, "big"))]

    ws = WebSocket(b"", "key", None, lambda text: 1 / 0, lambda clean, exc: ends.append(exc))
    ws.connection_made(Transport())
    ws.state = OPEN
    ws.data_received(server_frame(b"boom"))
    assert isinstance(ends[-1], ZeroDivisionError) and ws.transport.closed  # the generator counts reader_exception


@pytest.mark.parametrize("takeover", [True, False])
async def test_permessage_deflate_messages_are_inflated(takeover):
    ext = PerMessageDeflate(remote_no_context_takeover=not takeover, local_no_context_takeover=False,
                            remote_max_window_bits=15, local_max_window_bits=15)
    ws, got, ends = open_socket(ext)
    texts = ["bm 1 2 3 4 " * 20, "bm 1 2 3 4 " * 20, "z" * 100_000]
    comp = zlib.compressobj(wbits=-15)
    stream = b""
    for text in texts:
        if not takeover:
            comp = zlib.compressobj(wbits=-15)
        stream += server_frame(compressed(text, comp), rsv1=True)
    half = compressed("fragmented", comp if takeover else zlib.compressobj(wbits=-15))
    stream += server_frame(half[:3], rsv1=True, fin=False) + server_frame(half[3:], opcode=0) + server_frame(b"plain")
    for i in range(0, len(stream), 7):
        ws.data_received(stream[i:i + 7])
    assert got == [*texts, "fragmented", "plain"] and not ends


async def test_handshake_against_a_real_server_both_ways_and_refusals_named_as_before():
    received = []

    async def handler(conn):
        await conn.send("hello " + conn.request.headers["Cookie"])
        await conn.send(b"\x01\x02")
        await conn.send(["frag", "mented"])
        await conn.send("y" * 200_000)
        received.append(await conn.recv())
        await conn.close(1001)

    def refuse(conn, request):
        if "403" in request.path:
            return conn.respond(403, "no\n")
        return None

    for compression in ("deflate", None):
        async with serve(handler, "127.0.0.1", 0, process_request=refuse, compression=compression,
                         max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            base = f"ws://127.0.0.1:{port}"
            got, ends = [], []
            ws = await asyncio.wait_for(loadgen.open_socket(base, 7, "http://o", "sess", "deflate", got.append,
                                                            lambda clean, exc: ends.append((clean, exc))), 10)
            assert (ws.deflate is not None) == (compression == "deflate")
            await ws.send("bm 1 2 3 4")
            await asyncio.wait_for(asyncio.shield(ws.ended), 10)
            assert got == ["hello sessionid=sess", b"\x01\x02", "fragmented", "y" * 200_000]
            assert received == ["bm 1 2 3 4"] and ends == [(True, None)]
            await asyncio.wait_for(ws.close(), 5)
            assert ws.lost.done()
            received.clear()

            with pytest.raises(Exception) as refused:
                await asyncio.wait_for(loadgen.open_socket(f"{base}/403", 1, "http://o", "s", None, print), 10)
            assert type(refused.value).__name__ == "InvalidStatus"  # the failure reason the old client gave
    with pytest.raises(ValueError):
        await loadgen.open_socket("ws://10.0.0.1:1", 1, "http://o", "s", None, print)
    with pytest.raises(ConnectionRefusedError):
        await loadgen.open_socket(base, 1, "http://o", "s", None, print)  # the server is gone
