"""A small websocket chat client for tests and the benchmark (real sockets)."""
from __future__ import annotations

import json
import re
import secrets

from tests.contract.verify import Endpoint, User, read_until

MSG_ID = re.compile(r'data-msg-id="(\d+)"')


def endpoint(url: str, host: str | None = None) -> Endpoint:
    from urllib.parse import urlsplit

    return Endpoint(url, host or urlsplit(url).netloc, https_proxy=True, insecure=False)


def new_user(ep: Endpoint) -> User:
    user = User(ep, f"t-{secrets.token_hex(5)}", secrets.token_urlsafe(16))
    user.log_in(sign_up=True)
    return user


def create_room(user: User) -> int:
    response = user.form_post("/", {"name": f"room {secrets.token_hex(4)}"})
    assert response.status_code == 302, response.status_code
    return int(re.search(r"/rooms/(\d+)/", response.headers["location"]).group(1))


def message_ids(frames) -> list[int]:
    return [int(m.group(1)) for f in frames for m in [MSG_ID.search(f)] if m]


def send(ws, text: str):
    ws.send(json.dumps({"message": text}))


def wait_for_text(ws, text: str, timeout: float = 10):
    return read_until(ws, lambda f: "data-msg-id" in f and text in f, timeout)
