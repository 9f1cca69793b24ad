"""Message storage in batches: one database round trip for many messages.

Each worker runs the ORM on one thread (thread-sensitive sync_to_async), so
every `Message.objects.create` is a thread hop plus an INSERT, one after the
other; under load the sockets of a worker queue behind that thread. Here the
messages that arrive while a batch is being written go into the next batch,
written with one `bulk_create` (PostgreSQL returns the ids): the batch size
follows the load, and a lone message is written at once, as before.
"""
from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async

from app.chat.models import Message

MAX_BATCH = 500


@database_sync_to_async
def _insert(messages):
    return Message.objects.bulk_create(messages)


class BatchWriter:
    def __init__(self):
        self.pending: list[tuple[Message, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def store(self, room_id, user_id, body) -> Message:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((Message(room_id=room_id, author_id=user_id, body=body), future))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self):
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            try:
                await _insert([message for message, _ in batch])
            except Exception as exc:  # the database is down: every waiter of this batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            except BaseException:  # cancelled (worker shutting down): nobody waits forever
                for _, future in batch + self.pending:
                    if not future.done():
                        future.set_exception(RuntimeError("message writer stopped"))
                self.pending = []
                raise
            else:
                for message, future in batch:
                    if not future.done():
                        future.set_result(message)


_writers: dict = {}


async def store_message(room_id, user_id, body) -> Message:
    """Store one message (batched with concurrent ones); returns it with id and created_at."""
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        _writers.clear()  # one event loop per worker process; drop a closed one
        writer = _writers[loop] = BatchWriter()
    return await writer.store(room_id, user_id, body)
