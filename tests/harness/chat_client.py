"""A small websocket chat client for tests and the benchmark (real sockets)."""
from __future__ import annotations

import json
import re
import secrets

from tests.contract.verify import Endpoint, User, read_until

MSG_ID = re.compile(r'data-msg-id="(\d+)"')
MSG_SEQ = re.compile(r'data-msg-id="(\d+)"[^>]*data-seq="(\d+)"')
UPTO = re.compile(r'data-upto="(\d+)"')


class Shown:
    """What a room page shows, kept the way room.js keeps it.

    `after` is the reconnect cursor: the highest seq (a message's number in
    its room) below which every message is shown, or was skipped on purpose
    (a cursor frame, `data-upto`). Not the newest seq shown: a message can
    arrive before an older one that another worker publishes later.
    """

    def __init__(self, after: int = 0):
        self.after = after
        self.early: set[int] = set()  # seqs shown above the cursor
        self.ids: dict[int, int] = {}  # message id -> seq, of every message shown

    @staticmethod
    def parse(frame: str) -> tuple[int, int] | None:
        """(message id, seq) of a message frame, else None."""
        m = MSG_SEQ.search(frame)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def apply(self, frame: str) -> int | None:
        """Show a frame as the page would; the id of a newly shown message,
        None for anything else (a message already shown is dropped)."""
        skip = UPTO.search(frame)
        if skip:
            upto = int(skip.group(1))
            if upto > self.after:
                self.early = {s for s in self.early if s > upto}
                self.after = upto
                self._close_up()
            return None
        parsed = self.parse(frame)
        if parsed is None:
            return None
        message_id, seq = parsed
        if message_id in self.ids or seq <= self.after:
            return None
        self.ids[message_id] = seq
        self.early.add(seq)
        self._close_up()
        return message_id

    def _close_up(self):
        while self.after + 1 in self.early:
            self.after += 1
            self.early.remove(self.after)


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
