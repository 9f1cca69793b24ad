"""The load generator: a separate process holding many real websocket clients.

Run by the benchmark as `python -m bench.loadgen`; it reads one JSON command
per line on stdin and answers one JSON line on stdout:

  {"cmd": "connect", "base": "ws://127.0.0.1:PORT", "origin": "...",
   "clients": [[cid, room_id, session_key], ...], "concurrency": 64, "timeout": 120}
      -> {"connected": [cid, ...], "failed": {reason: n}, "seconds": s}
  {"cmd": "run", "step": s, "rate": per-client msgs/s, "duration": s, "drain": s,
   "room_sizes": {room_id: members}, "senders": [cid, ...] | null,
   "min_sends": n (each sender sends at least n), "lat_cap": n | null (keep a uniform sample of n latencies)}
      -> totals of this process for step s (sent, expected deliveries, unique
         deliveries, duplicates, latencies in microseconds, errors, CPU seconds)
  {"cmd": "churn", "base": ..., "origin": ..., "clients": [[cid, room_id, session_key], ...],
   "rate": reconnects/s, "duration": s, "hold": s, "concurrency": n}
      -> {"started", "completed", "failed": {reason: n}, "closed_by_server", "skipped", "seconds"}
         (transient sockets: connect, read for `hold` s, close; never kept in the pool)
  {"cmd": "close"} -> {"closed": n} and the process exits

Every message text is `bm <step> <sender cid> <seq> <monotonic ns at send>`:
CLOCK_MONOTONIC is one clock for every process on the machine, so a receiver
in another generator process measures send -> receive latency directly. The
generator reads that text, not the frame's data-msg-id/data-seq: its clients
never reconnect, so they need no cursor (tests/harness/chat_client.Shown).
Only 127.0.0.1 is ever contacted (the coordinator passes the base URL).

The sockets are `WebSocket` below, a lean client on asyncio.Protocol rather than the websockets
asyncio client: it shares the machine's 2 cores with the server being measured, and nearly all
of its work is one small text frame per delivery, parsed straight out of data_received into
Generator.on_frame. The handshake sends the request the websockets client sent (same headers,
the same permessage-deflate offer with --compression deflate) and a refusal raises the
exception class the websockets client raised (InvalidStatus for a 403/429, InvalidMessage,
TimeoutError, ConnectionRefusedError...): its name is the failure reason, as before.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
import zlib
from collections import Counter
from functools import partial
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import (
    InvalidHeader, InvalidHeaderValue, InvalidMessage, InvalidStatus, InvalidUpgrade, NegotiationError,
)
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import OK_CLOSE_CODES, Frame, Opcode
from websockets.headers import build_extension, build_host, parse_connection, parse_extension, parse_upgrade
from websockets.http11 import USER_AGENT, Response
from websockets.utils import accept_key, generate_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback
    from websockets.utils import apply_mask

MARK = '<p class="body">bm '
MAX_MESSAGE = 1 << 20  # the websockets client's default max_size: a bigger message fails the socket (1009)
MAX_HEAD = 64 * 1024  # the 101 response's status line and headers
CLOSE_TIMEOUT = 2.0  # the old client's close_timeout: then the socket is aborted
LOOPBACK = ("127.0.0.1", "::1", "localhost")
CONNECTING, OPEN, CLOSING = 0, 1, 2


class SocketClosed(Exception):
    """send() on a socket that is closing or closed (the old client's ConnectionClosed)."""


def masked_frame(first: int, payload: bytes) -> bytes:
    """A client-to-server frame: `first` is FIN|RSV|opcode, the payload masked with a fresh key."""
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0xFF)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


class WebSocket(asyncio.Protocol):
    """A lean websocket client: the generator's per-received-frame CPU is this class's data_received.

    The HTTP/1.1 Upgrade request is written here, the 101 checked as the websockets client checks
    it (a refusal raises the same exception class: its name is the failure reason), then every
    server frame is parsed straight out of data_received and handed to `on_message` (a str for
    text, bytes for binary; None drops messages) in the same call: no task wake-up, no frame
    objects, no queue. Pings are answered, a close frame is echoed, messages compressed with a
    negotiated permessage-deflate are inflated. `on_end(clean, exc)` is called once when the
    socket stops being open: clean is the old client's ConnectionClosedOK (close frames with
    1000/1001/no code both ways), exc an exception raised by on_message.
    """

    def __init__(self, request: bytes, key: str, offer, on_message, on_end=None):
        self.loop = asyncio.get_running_loop()
        self.request, self.key, self.offer = request, key, offer
        self.on_message, self.on_end = on_message, on_end
        self.transport = None
        self.state = CONNECTING
        self.opened = self.loop.create_future()  # the handshake: None or its exception
        self.ended = self.loop.create_future()  # no longer open (close frame, failure, connection lost)
        self.lost = self.loop.create_future()  # the TCP connection is gone
        self.buf = bytearray()
        self.need = 0  # bytes the buffered partial frame needs before it is parsed again
        self.frag = None  # payloads of a fragmented message
        self.frag_first = 0
        self.frag_size = 0
        self.deflate = None  # the negotiated PerMessageDeflate (its encoder compresses our sends)
        self.decoder = None
        self.close_rcvd = self.close_sent = None  # close codes (1005: none in the frame)
        self.paused = False
        self.drain = None

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        if not self.opened.done():
            err = InvalidMessage("did not receive a valid HTTP response")
            err.__cause__ = EOFError("connection closed while reading HTTP status line")
            self.opened.set_exception(err)
        self._end(None)
        if not self.lost.done():
            self.lost.set_result(None)
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def data_received(self, data):
        if self.state != OPEN:
            if self.state == CONNECTING:
                self._handshake(data)
            return  # closing: what follows a close frame is not read
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = bytes(buf)
            buf.clear()
        try:
            self._frames(data)
        except UnicodeDecodeError:  # a text message that is not UTF-8
            self._fail(1007)
        except Exception as exc:  # noqa: BLE001 - on_message failed: counted by on_end, the socket fails
            self._fail(1011, exc)

    # --- server frames -------------------------------------------------------------------
    def _frames(self, data):
        on_message = self.on_message
        n = len(data)
        pos = 0
        while pos < n:
            if n - pos < 2:
                need = 2
                break
            b0 = data[pos]
            ln = data[pos + 1]
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    need = 4
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    need = 10
                    break
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            else:  # the mask bit: a server never masks (RFC 6455 5.1)
                return self._fail(1002)
            if ln > MAX_MESSAGE:
                return self._fail(1009)
            end = start + ln
            if end > n:
                need = end - pos
                break
            if b0 == 0x81 and self.frag is None:  # FIN, text, no RSV bit: nearly every frame
                if on_message is not None:
                    on_message(data[start:end].decode())
            elif not self._other(b0, data[start:end]):
                return
            pos = end
        else:
            return
        self.buf += data[pos:]
        self.need = need

    def _other(self, b0, payload) -> bool:
        """Every frame but an unfragmented uncompressed text one; False once the socket is not open."""
        op = b0 & 0x0F
        rsv = b0 & 0x70
        if rsv and (rsv != 0x40 or self.deflate is None or op not in (1, 2)):
            return self._fail(1002)  # RSV1 only opens a message of a negotiated permessage-deflate
        if op >= 8:
            if not b0 & 0x80 or len(payload) > 125:
                return self._fail(1002)  # control frames are never fragmented, at most 125 bytes
            if op == 9:  # ping -> pong with the same data
                self.transport.write(masked_frame(0x8A, payload))
                return True
            if op == 10:
                return True
            if op == 8:
                self._close_received(payload)
                return False
            return self._fail(1002)
        if op == 0:
            if self.frag is None:
                return self._fail(1002)  # a continuation with no message started
            self.frag.append(payload)
            self.frag_size += len(payload)
            if self.frag_size > MAX_MESSAGE:
                return self._fail(1009)
            if not b0 & 0x80:
                return True
            first, payload = self.frag_first, b"".join(self.frag)
            self.frag = None
        elif op in (1, 2):
            if self.frag is not None:
                return self._fail(1002)  # a new message inside a fragmented one
            if not b0 & 0x80:
                self.frag, self.frag_first, self.frag_size = [payload], b0, len(payload)
                return True
            first = b0
        else:
            return self._fail(1002)  # reserved opcode
        if first & 0x40:
            if self.decoder is None:
                self.decoder = zlib.decompressobj(wbits=-self.deflate.remote_max_window_bits)
            payload = self.decoder.decompress(payload + b"\x00\x00\xff\xff", MAX_MESSAGE)
            if self.decoder.unconsumed_tail:
                return self._fail(1009)
            if self.deflate.remote_no_context_takeover:
                self.decoder = None
        if self.on_message is not None:
            self.on_message(payload.decode() if first & 0x0F == 1 else bytes(payload))
        return True

    def _close_received(self, payload):
        if len(payload) == 1:
            self._fail(1002)
            return
        self.close_rcvd = int.from_bytes(payload[:2], "big") if payload else 1005
        if self.close_sent is None:  # the server's close: echoed, then the server closes TCP
            self.close_sent = self.close_rcvd
            self.transport.write(masked_frame(0x88, payload[:2]))
        self._end(None)
        self.loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _abort(self):
        if not self.lost.done():
            self.transport.abort()

    def _fail(self, code, exc=None) -> bool:
        """A protocol error (1002), invalid UTF-8 (1007), too big (1009), on_message raised (1011)."""
        if self.close_sent is None and self.state != CONNECTING:
            self.close_sent = code
            self.transport.write(masked_frame(0x88, code.to_bytes(2, "big")))
        self._end(exc)
        self.transport.close()
        return False

    def _end(self, exc):
        was_open = self.state == OPEN
        self.state = CLOSING
        if not was_open:  # already ended, or never opened (the handshake's failure is the caller's)
            return
        self.buf.clear()
        self.frag = None
        if not self.ended.done():
            self.ended.set_result(None)
        if self.on_end is not None:
            self.on_end(self.clean, exc)

    @property
    def clean(self) -> bool:
        return self.close_rcvd in OK_CLOSE_CODES and self.close_sent in OK_CLOSE_CODES

    # --- opening handshake ---------------------------------------------------------------
    def _handshake(self, data):
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._refused(InvalidMessage("did not receive a valid HTTP response"))
            return
        head, rest = bytes(buf[:end]), bytes(buf[end + 4:])
        buf.clear()
        try:
            self._check_response(head)
        except Exception as exc:  # noqa: BLE001 - the failure reason is its class name, as before
            self._refused(exc)
            return
        self.state = OPEN
        self.opened.set_result(None)
        if rest:
            self.data_received(rest)  # frames sent right behind the 101 (the replay)

    def _refused(self, exc):
        self.opened.set_exception(exc)
        self.state = CLOSING
        self.buf.clear()
        self.transport.close()

    def _check_response(self, head: bytes):
        """What websockets.client.ClientProtocol.process_response checks, raising the same classes."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[0] != "HTTP/1.1" or not parts[1].isdigit() or len(lines) > 129:
            raise InvalidMessage("did not receive a valid HTTP response")
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name:
                raise InvalidMessage("did not receive a valid HTTP response")
            headers[name] = value.strip(" \t")
        status = int(parts[1])
        if status != 101:
            raise InvalidStatus(Response(status, parts[2] if len(parts) > 2 else "", headers))
        connection = sum([parse_connection(v) for v in headers.get_all("Connection")], [])
        if not any(v.lower() == "upgrade" for v in connection):
            raise InvalidUpgrade("Connection", ", ".join(connection) if connection else None)
        upgrade = sum([parse_upgrade(v) for v in headers.get_all("Upgrade")], [])
        if not (len(upgrade) == 1 and upgrade[0].lower() == "websocket"):
            raise InvalidUpgrade("Upgrade", ", ".join(upgrade) if upgrade else None)
        accept = headers.get_all("Sec-WebSocket-Accept")
        if len(accept) != 1:
            raise InvalidHeader("Sec-WebSocket-Accept", "multiple values" if accept else None)
        if accept[0] != accept_key(self.key):
            raise InvalidHeaderValue("Sec-WebSocket-Accept", accept[0])
        accepted = []
        for value in headers.get_all("Sec-WebSocket-Extensions"):
            for name, params in parse_extension(value):
                if self.offer is None or name != self.offer.name:
                    raise NegotiationError(f"Unsupported extension: name = {name}, params = {params}")
                accepted.append(self.offer.process_response_params(params, accepted))
        if accepted:
            self.deflate = accepted[0]
        if headers.get_all("Sec-WebSocket-Protocol"):
            raise NegotiationError("no subprotocols supported")

    # --- sending and closing -------------------------------------------------------------
    async def send(self, text: str):
        if self.state != OPEN:
            raise SocketClosed()
        if self.deflate is not None:  # compressed as the old client compressed (per-message deflate)
            frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=True, extensions=[self.deflate])
        else:
            frame = masked_frame(0x81, text.encode())
        self.transport.write(frame)
        if self.paused:  # the server reads slower than we write: wait, as the old client's send did
            self.drain = self.loop.create_future()
            await self.drain

    async def close(self):
        """Close frame 1000, then wait (CLOSE_TIMEOUT) for the server to close TCP; abort otherwise."""
        if self.transport is None or self.lost.done():
            return
        if self.close_sent is None and self.state == OPEN:
            self.close_sent = 1000
            self.transport.write(masked_frame(0x88, b"\x03\xe8"))
            self._end(None)
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_TIMEOUT)
        except TimeoutError:
            self.transport.abort()


async def open_socket(base: str, room, origin: str, session: str, compression, on_message, on_end=None) -> WebSocket:
    """Connect and handshake as the old `websockets.connect(...)` call did (same request headers)."""
    url = urlsplit(f"{base}/ws/rooms/{room}/")
    if url.scheme != "ws" or url.hostname not in LOOPBACK:
        raise ValueError(f"the generator only contacts ws://127.0.0.1, not {base!r}")
    port = url.port or 80
    key = generate_key()
    offer = ClientPerMessageDeflateFactory(compress_settings={"memLevel": 5}) if compression == "deflate" else None
    lines = [f"GET {url.path or '/'}{'?' + url.query if url.query else ''} HTTP/1.1",
             f"Host: {build_host(url.hostname, port, False)}", f"Origin: {origin}",
             "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if offer is not None:
        lines.append(f"Sec-WebSocket-Extensions: {build_extension([(offer.name, offer.get_request_params())])}")
    lines += [f"Cookie: sessionid={session}", "X-Forwarded-Proto: https", f"User-Agent: {USER_AGENT}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    transport, ws = await loop.create_connection(lambda: WebSocket(request, key, offer, on_message, on_end),
                                                 url.hostname, port)
    try:
        await ws.opened
    except BaseException:  # refused, or cancelled by the caller's timeout: never left open
        transport.abort()
        raise
    return ws


class Client:
    __slots__ = ("cid", "room", "session", "ws", "seen")

    def __init__(self, cid, room, session):
        self.cid, self.room, self.session = cid, room, session
        self.ws: WebSocket | None = None
        self.seen = {}  # step -> set of (sender, seq): duplicates are per receiver


class Generator:
    def __init__(self):
        self.clients: dict[int, Client] = {}
        self.stats = {}  # step -> {"unique", "dup", "lat"}
        self.reported = set()
        self.late = 0
        self.errors = Counter()
        self.window_open = False
        self.window_deliveries = 0
        self.closed_by_server = 0
        self.lat_cap = None  # per step (cmd_run's lat_cap)
        self.rng = random.Random()
        self.compression = None

    # --- receiving -----------------------------------------------------------
    def on_frame(self, client: Client, frame):
        now = time.monotonic_ns()
        if not isinstance(frame, str):
            self.errors["binary_frame"] += 1
            return
        i = frame.find(MARK)
        if i < 0:
            if 'data-upto="' in frame:  # a cursor frame (a replay cut short): not a delivery, not an error
                return
            j = frame.find('data-error="')
            if j >= 0:
                self.errors[frame[j + 12:frame.find('"', j + 12)]] += 1
            else:
                self.errors["unknown_frame"] += 1
            return
        j = frame.find("</p>", i)
        try:
            step, sender, seq, sent_ns = map(int, frame[i + len(MARK):j].split())
        except ValueError:
            self.errors["unparsable_frame"] += 1
            return
        if self.window_open:
            self.window_deliveries += 1
        if step in self.reported:
            self.late += 1
            return
        seen = client.seen.get(step)
        if seen is None:
            seen = client.seen[step] = set()
        st = self.stats.get(step)
        if st is None:
            st = self.stats[step] = {"unique": 0, "dup": 0, "lat": []}
        key = (sender, seq)
        if key in seen:
            st["dup"] += 1
            return
        seen.add(key)
        st["unique"] += 1
        lat = st["lat"]
        if self.lat_cap is None or len(lat) < self.lat_cap:
            lat.append((now - sent_ns) // 1000)
        else:  # reservoir sampling: a uniform sample of a long step's latencies in bounded memory
            k = self.rng.randrange(st["unique"])
            if k < self.lat_cap:
                lat[k] = (now - sent_ns) // 1000

    def on_end(self, _clean, exc):
        """A pooled socket stopped reading (closed by either side or failed)."""
        if exc is not None:  # on_frame raised: counted, never fatal to the generator
            self.errors["reader_exception"] += 1
        self.closed_by_server += 1

    # --- commands ------------------------------------------------------------
    async def cmd_connect(self, base, origin, clients, concurrency=64, timeout=120.0):
        started = time.monotonic()
        deadline = started + timeout
        gate = asyncio.Semaphore(concurrency)
        failed = Counter()
        connected = []

        async def one(cid, room, session):
            async with gate:
                left = deadline - time.monotonic()
                if left <= 0:
                    failed["deadline"] += 1
                    return
                client = Client(cid, room, session)
                try:  # frames are handed to on_frame from the socket's data_received from the start
                    client.ws = await asyncio.wait_for(open_socket(
                        base, room, origin, session, self.compression,
                        partial(self.on_frame, client), self.on_end), min(30, left))
                except Exception as exc:  # noqa: BLE001 - the failure reason is the exception's class name
                    failed[type(exc).__name__] += 1
                    return
                self.clients[cid] = client
                connected.append(cid)

        await asyncio.gather(*(one(*c) for c in clients))
        return {"connected": connected, "failed": dict(failed), "seconds": time.monotonic() - started}

    async def cmd_run(self, step, rate, duration, drain, room_sizes, senders=None, min_sends=0, lat_cap=None):
        room_sizes = {int(k): v for k, v in room_sizes.items()}
        self.lat_cap = lat_cap
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        end = start + duration
        errors0 = Counter(self.errors)
        sent = Counter()
        send_failed = Counter()

        async def sender(client: Client):
            rng = random.Random()
            seq = 0
            at = start
            while True:  # a Poisson process: exponential gaps, bounded by the step's end
                at += rng.expovariate(rate)
                if at >= end:
                    if seq >= min_sends:
                        break
                    at = end  # a probe: at least min_sends messages even if the schedule ended first
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                text = f"bm {step} {client.cid} {seq} {time.monotonic_ns()}"
                try:
                    await client.ws.send('{"message": "%s"}' % text)
                except SocketClosed:
                    send_failed["closed"] += 1
                    break
                seq += 1
            sent[client.cid] = seq

        chosen = [self.clients[c] for c in senders if c in self.clients] if senders is not None else list(self.clients.values())
        self.window_deliveries = 0
        self.window_open = True
        await asyncio.gather(*(sender(c) for c in chosen))
        self.window_open = False
        window = time.monotonic() - start
        window_deliveries = self.window_deliveries
        await asyncio.sleep(drain)
        self.reported.add(step)
        st = self.stats.pop(step, {"unique": 0, "dup": 0, "lat": []})
        for client in self.clients.values():
            client.seen.pop(step, None)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        expected = sum(n * room_sizes.get(self.clients[cid].room, 0) for cid, n in sent.items())
        return {
            "step": step, "sent": sum(sent.values()), "expected": expected, "unique": st["unique"], "dup": st["dup"],
            "lat_us": st["lat"], "window_s": window, "window_deliveries": window_deliveries,
            "errors": dict(Counter(self.errors) - errors0), "send_failed": dict(send_failed),
            "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
            "open": sum(1 for c in self.clients.values() if c.ws.state == OPEN),
        }

    async def cmd_churn(self, base, origin, clients, rate, duration, hold=1.0, concurrency=256, timeout=30.0):
        """Connect/disconnect churn: `rate` new sockets per second for `duration` s, each held `hold` s.

        Sessions are taken round robin from `clients` (more sessions than sockets open at once,
        so no user exceeds the per-user socket limit). A socket counts as completed once it
        opened, stayed `hold` s and was closed by us; refused handshakes count by exception type; a
        socket the server closed first counts as closed_by_server when both close codes were
        1000/1001 (the old client's ConnectionClosedOK), else as failed close_ConnectionClosedError.
        """
        started = time.monotonic()
        end = started + duration
        gate = asyncio.Semaphore(concurrency)
        failed = Counter()
        counts = Counter()
        tasks = set()

        async def one(cid, room, session):
            try:  # the replay and any traffic: parsed (pings answered), never kept
                ws = await asyncio.wait_for(open_socket(base, room, origin, session, self.compression, None), timeout)
            except Exception as exc:  # noqa: BLE001 - counted
                failed[type(exc).__name__] += 1
                gate.release()
                return
            try:
                closed_early = False
                try:
                    await asyncio.wait_for(asyncio.shield(ws.ended), hold)
                    closed_early = True  # the server closed it before `hold` ran out
                except TimeoutError:
                    pass
                await asyncio.wait_for(ws.close(), 5)
                if closed_early and not ws.clean:
                    failed["close_ConnectionClosedError"] += 1
                else:
                    counts["closed_by_server" if closed_early else "completed"] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                failed[f"close_{type(exc).__name__}"] += 1
            finally:
                gate.release()

        at = started
        n = 0
        while True:  # evenly spaced starts at `rate`/s (a reconnect: a socket goes, another comes)
            at += 1.0 / rate
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if gate.locked():  # too many still connecting/open: counted, never queued without bound
                counts["skipped"] += 1
                continue
            await gate.acquire()
            cid, room, session = clients[n % len(clients)]
            n += 1
            counts["started"] += 1
            task = asyncio.create_task(one(cid, room, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _done, pending = await asyncio.wait(list(tasks), timeout=hold + timeout + 10)
            for task in pending:  # bounded: whatever is still hanging is counted and dropped
                task.cancel()
                failed["unfinished"] += 1
        return {"started": counts["started"], "completed": counts["completed"], "failed": dict(failed),
                "closed_by_server": counts["closed_by_server"], "skipped": counts["skipped"],
                "seconds": time.monotonic() - started}

    async def cmd_close(self):
        async def one(c):
            try:
                await asyncio.wait_for(c.ws.close(), 3)
            except Exception:  # noqa: BLE001
                pass

        gate = asyncio.Semaphore(256)

        async def gated(c):
            async with gate:
                await one(c)

        await asyncio.wait_for(asyncio.gather(*(gated(c) for c in self.clients.values())), 60)
        return {"closed": len(self.clients)}


async def main(compression):
    gen = Generator()
    gen.compression = compression
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            return
        command = json.loads(line)
        name = command.pop("cmd")
        try:
            if name == "close":
                try:
                    result = await gen.cmd_close()
                except asyncio.TimeoutError:
                    result = {"closed": "timeout"}
            else:
                result = await getattr(gen, f"cmd_{name}")(**command)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator
            result = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(result) + "\n")
        out.flush()
        if name == "close":
            return


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop else asyncio.run)(main(None if args.compression == "none" else "deflate"))
