"""The test suites' websocket client over TLS 1.3 (tests/contract/ws_client.py).

A local TLS 1.3 server that sends session tickets, as nginx, Caddy and the
platforms' routers do: every connect must complete, from several threads at
once (none may hang), and big frames, concurrent reads and writes and a
server close must work through the blocking facade over websockets' asyncio
client. The server is websockets' asyncio server on its own event loop.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time

import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.contract.verify import Endpoint
from tests.contract.ws_client import BlockingWebsocket

THREADS, CONNECTS = 4, 500


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    assert context.num_tickets == 2  # the tickets that set off the hang

    async def handler(ws):
        async for message in ws:
            if message == "close please":
                await ws.close(1012, "restart")
                return
            await ws.send(message)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tls-test-server", daemon=True)
    thread.start()
    async def start():
        return await serve(handler, "127.0.0.1", 0, ssl=context)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = server.sockets[0].getsockname()[1]
    yield Endpoint(f"https://127.0.0.1:{port}", "localhost", https_proxy=False, insecure=True)
    server.close()
    asyncio.run_coroutine_threadsafe(server.wait_closed(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_many_connects_from_several_threads_all_complete(tls_server):
    failures, done = [], []

    def client(n):
        for i in range(CONNECTS):
            text = f"hello {n}-{i}"
            started = time.monotonic()
            try:
                with tls_server.websocket("/") as ws:
                    assert isinstance(ws, BlockingWebsocket)
                    assert ws.tls_version == "TLSv1.3"
                    ws.send(text)
                    assert ws.recv(timeout=5) == text
                done.append(time.monotonic() - started)
            except Exception as exc:
                failures.append(f"{text} after {time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not [t for t in threads if t.is_alive()], f"a client thread is stuck ({len(done)} connects done)"
    assert not failures, f"{len(failures)} of {THREADS * CONNECTS} failed: {failures[:3]}"
    assert len(done) == THREADS * CONNECTS and max(done) < 5, max(done)


def test_big_frames_and_reads_while_writing(tls_server):
    big = "x" * 200_000  # many TLS records in one frame
    with tls_server.websocket("/") as ws:
        ws.send(big)
        assert ws.recv(timeout=10) == big
        # One thread writes while this one reads the echoes.
        texts = [f"m{i}" for i in range(300)]
        writer = threading.Thread(target=lambda: [ws.send(t) for t in texts])
        writer.start()
        got = [ws.recv(timeout=10) for _ in texts]
        writer.join(10)
        assert got == texts


def test_server_close_reaches_the_client(tls_server):
    with tls_server.websocket("/") as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1012


def test_handshake_against_a_non_tls_peer_fails_cleanly():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_plain_text():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_plain_text, daemon=True).start()
    endpoint = Endpoint(f"https://127.0.0.1:{listener.getsockname()[1]}", "localhost", https_proxy=False, insecure=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        endpoint.websocket("/")
    listener.close()
