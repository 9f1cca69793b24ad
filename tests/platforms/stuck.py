"""A connection that never finishes its request: headers announcing a body
that never fully arrives. Django's ASGI handler reads the whole body before
any view or middleware runs, so the worker's task waits on it until the
connection closes: the case a drain must give up on by itself."""
from __future__ import annotations

import socket
import time


def open_stuck_request(host: str, port: int, settle: float = 1.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"POST /accounts/login/ HTTP/1.1\r\nHost: stuck.invalid\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\nusername=")
    time.sleep(settle)  # let a worker accept it and start waiting for the body
    return sock


def still_open(sock: socket.socket) -> bool:
    """True while the server has neither answered nor closed the connection."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
