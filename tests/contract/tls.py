"""TLS for the websocket client that is safe with websockets' two threads.

websockets' sync client reads in a background thread while the caller's
thread writes, both on one `ssl.SSLSocket`, i.e. one OpenSSL object. With
TLS 1.3 the server sends session tickets right after the handshake: the
reading thread's SSL_read takes them and then blocks inside OpenSSL, waiting
for data, while the other thread writes the upgrade request through the same
object. Now and then the 101 answer is never read: the connect times out and
its clean-up waits forever for the reading thread (seen in CI: a client
thread stuck in connect; measured here against a local TLS 1.3 server: 9
and 17 of 2,000 connects failed, none with TLS 1.2 or without tickets, none
through this socket: tests/integration/test_tls_client.py).

`LockedTLSSocket` runs TLS in memory (`ssl.MemoryBIO`) behind a lock and does
the blocking read on the plain socket outside it, so the TLS object is never
used by two threads at once, whatever the protocol version.
"""
from __future__ import annotations

import socket
import ssl
import threading


class LockedTLSSocket:
    """The socket methods websockets' sync client uses; the rest (fileno for
    its poller, setsockopt, shutdown, close ...) are the plain socket's."""

    bufsize = 65536

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None):
        self.sock = sock
        # Handshake flights and frames are small writes: without this, Nagle and
        # delayed ACKs add ~40 ms to a connect.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.lock = threading.Lock()
        # The handshake runs before websockets starts its reading thread: no lock
        # needed; `sock`'s own timeout bounds it.
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionResetError("the server closed the connection during the TLS handshake") from None

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(self.bufsize)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    def recv(self, buflen: int = bufsize) -> bytes:
        """Everything decrypted so far (possibly more than `buflen`): data left
        in the memory buffer would never wake websockets' poller."""
        while True:
            with self.lock:
                chunks, eof = [], False
                try:
                    while True:
                        chunk = self.tls.read(self.bufsize)
                        if not chunk:  # close_notify
                            eof = True
                            break
                        chunks.append(chunk)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    eof = True
                self._flush()  # TLS may answer while reading (alerts, key updates)
                if chunks:
                    return b"".join(chunks)
                if eof:
                    return b""
            # Nothing to decrypt yet: block on the plain socket, not holding the lock.
            data = self.sock.recv(self.bufsize)
            with self.lock:
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()

    def sendall(self, data) -> None:
        with self.lock:
            self.tls.write(data)  # a memory BIO takes everything at once
            self._flush()

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)
