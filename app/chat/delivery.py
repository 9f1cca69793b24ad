"""What one socket has been sent, by seq (the room's message number, Message.seq).

Seqs are gap-free and commit in order, but they are *published* in any order:
worker B can publish 100 before worker A publishes 99. So a socket's state is
a watermark, `upto` (every seq up to it was sent, or skipped on purpose), plus
the few seqs above it that were sent early. A frame is sent at most once per
socket; a stored message a socket has not been sent is always above `upto`,
so "read everything after `upto`" (the resync) finds it. The page keeps the
same watermark and reconnects with ?after=<upto> (app/chat/static/chat/room.js).
"""
from __future__ import annotations


class Delivered:
    __slots__ = ("upto", "above")

    def __init__(self, upto: int):
        self.upto = upto
        self.above: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq <= self.upto or seq in self.above

    def add(self, seq: int) -> bool:
        """Record `seq` as sent; False if it was sent (or skipped) already."""
        if seq in self:
            return False
        self.above.add(seq)
        self._close_up()
        return True

    def advance_to(self, top: int) -> bool:
        """Everything up to `top` is now sent or skipped (a database read showed
        what exists up to there). True if some seq in between was not sent:
        the client must be told (rendering.cursor_frame), or it would wait for it."""
        if top <= self.upto:
            return False
        sent = sum(1 for seq in self.above if seq <= top)
        skipped = sent < top - self.upto
        self.above = {seq for seq in self.above if seq > top}
        self.upto = top
        self._close_up()
        return skipped

    def _close_up(self) -> None:
        while self.upto + 1 in self.above:
            self.upto += 1
            self.above.remove(self.upto)
