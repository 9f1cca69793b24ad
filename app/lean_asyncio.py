"""asyncio.Queue and asyncio.Event for objects that exist once per socket.

Every open websocket held two asyncio.Queue (Uvicorn's receive queue, the
channel layer's queue of its channel) and an asyncio.Event (Uvicorn's
`writable`). Each Queue builds three deques and an Event (a fourth deque) up
front; an empty deque is a 64-slot block, so one idle Queue is ~3 KiB and one
Event ~0.8 KiB (CPython 3.11, tracemalloc in a worker holding 1,000 sockets;
bench/README.md "Memory per socket"). These keep the same interface for the
ways they are used here (an unbounded queue, normally one reader) and allocate
a deque (items) or a list (waiters) only while items or waiters exist.

Semantics follow asyncio's: items come out in order; a waiting `get` is woken
by `put_nowait`, a cancelled one passes its wake-up on; `Event.wait` returns
True once `set` is called.
"""
from __future__ import annotations

import asyncio
import collections


class LeanQueue:
    """An unbounded asyncio.Queue (put_nowait/put/get/get_nowait/empty/qsize)."""

    __slots__ = ("_items", "_getters")

    def __init__(self):
        self._items: collections.deque | None = None  # only while items wait
        self._getters: list | None = None  # only while someone waits (a list: an empty deque is ~0.6 KiB)

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._wakeup_next()

    async def put(self, item) -> None:
        self.put_nowait(item)

    def get_nowait(self):
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    async def get(self):
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()  # in case it is not done yet
                self._discard(getter)
                if self._items and not getter.cancelled():
                    self._wakeup_next()  # it was woken, but leaves: the next one takes the item
                raise
        return self.get_nowait()

    def _discard(self, getter) -> None:
        getters = self._getters
        if getters is not None:
            try:
                getters.remove(getter)
            except ValueError:
                pass
            if not getters:
                self._getters = None

    def _wakeup_next(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break
        if not getters:
            self._getters = None


class LeanEvent:
    """asyncio.Event (set/clear/is_set/wait)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self):
        self._value = False
        self._waiters: list | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for fut in waiters or ():
                if not fut.done():
                    fut.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
            return True
        finally:
            waiters = self._waiters
            if waiters is not None:
                try:
                    waiters.remove(fut)
                except ValueError:
                    pass
                if not waiters:
                    self._waiters = None
