"""Message storage in batches: one database round trip for many messages.

Each worker runs the ORM on one thread (thread-sensitive sync_to_async), so
every `Message.objects.create` is a thread hop plus an INSERT, one after the
other; under load the sockets of a worker queue behind that thread. Here the
messages that arrive while a batch is being written go into the next batch,
written with one statement: the batch size follows the load, and a lone
message is written at once, as before.

On PostgreSQL the batch statement runs on the event loop, on a connection of
the writer's own (psycopg's AsyncConnection, `_PostgresWriter`), not on the
ORM's thread: no thread hop, no wait for the GIL while the event loop runs
(up to the 5 ms switch interval, several times per statement), and no place
in the queue behind the handshakes' reads. SQLite (`make run`, unit tests)
keeps the ORM's thread.

Sequence numbers (Message.seq): the same statement locks the batch's rooms
(in id order, so two workers' batches cannot deadlock), raises each room's
`last_seq` by the number of its messages in the batch (one UPDATE row per
room, not per message) and inserts the messages numbered from the old value.
The lock is held until the statement's transaction commits, so a room's seqs
are gap-free and commit in order: any reader sees seqs 1..N of a room, never
N+1 without N. That is what makes "everything after seq N" a safe cursor for
the replay and the resync (app/chat/consumers.py), whatever order two workers
commit or publish in.

A bad row fails alone: a message for a room that no longer exists is simply
not inserted (its room is not locked, so it gets no seq) and its sender gets
the error; if the batch statement fails on data (an author deleted meanwhile:
a foreign-key error, ...), each message of the batch is written on its own so
everybody else's is stored. An outage (the database is down) fails the whole
batch at once: retrying row by row would only wait N times as long.
"""
from __future__ import annotations

import asyncio
import logging
import select
from collections import defaultdict
from typing import Callable

import psycopg
from channels.db import database_sync_to_async
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from app.chat.models import Message, Room
from app.observability import metrics

log = logging.getLogger(__name__)

MAX_BATCH = 500

# One round trip for the whole batch (PostgreSQL). `locked` takes the room rows
# in id order (ORDER BY is applied before FOR UPDATE locks); `bumped` is only
# ever joined to rows `locked` already holds, so every lock is taken in order.
INSERT_BATCH = """
WITH batch AS (
    SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[], %s::integer[])
        AS b(room_id, author_id, body, created_at, k)
), counts AS (
    SELECT room_id, count(*) AS n FROM batch GROUP BY room_id
), locked AS (
    SELECT r.id FROM chat_room r WHERE r.id IN (SELECT room_id FROM counts) ORDER BY r.id FOR UPDATE
), bumped AS (
    UPDATE chat_room r SET last_seq = r.last_seq + c.n
    FROM locked l JOIN counts c ON c.room_id = l.id
    WHERE r.id = l.id
    RETURNING r.id, r.last_seq - c.n AS base
)
INSERT INTO chat_message (room_id, author_id, body, created_at, seq)
SELECT b.room_id, b.author_id, b.body, b.created_at, bumped.base + b.k
FROM batch b JOIN bumped ON bumped.id = b.room_id
ORDER BY b.room_id, b.k
RETURNING id, room_id, seq
"""


class RoomGone(Exception):
    """The message's room was deleted before the message was written."""


class NotAdmitted(Exception):
    """The message's admission (store_message's `admission`) said no; `reason` is what it returned."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _numbered(messages: list[Message]) -> list[int]:
    """k = 1, 2, 3 ... for each room's messages, in arrival order."""
    counter: dict[int, int] = defaultdict(int)
    ks = []
    for m in messages:
        counter[m.room_id] += 1
        ks.append(counter[m.room_id])
    return ks


def _assign(messages: list[Message], ks: list[int], rows) -> None:
    """Set seq and pk from INSERT_BATCH's rows (id, room_id, seq)."""
    # A room's messages got base+1 .. base+n in k order: the k-th smallest
    # returned seq of a room is its k-th message.
    by_room: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for message_id, room_id, seq in rows:
        by_room[room_id].append((seq, message_id))
    for returned in by_room.values():
        returned.sort()
    for m, k in zip(messages, ks):
        returned = by_room.get(m.room_id)
        if returned:
            m.seq, m.pk = returned[k - 1]


def _insert_portable(messages: list[Message]) -> None:
    """The same numbering for SQLite (`make run`, unit tests), where a write
    transaction locks the whole database: a few statements, no round trips."""
    counts: dict[int, int] = defaultdict(int)
    for m in messages:
        counts[m.room_id] += 1
    with transaction.atomic():
        base = {}
        for room_id in sorted(counts):
            if Room.objects.filter(pk=room_id).update(last_seq=F("last_seq") + counts[room_id]):
                base[room_id] = Room.objects.filter(pk=room_id).values_list("last_seq", flat=True).get() - counts[room_id]
        keep = []
        for m, k in zip(messages, _numbered(messages)):
            if m.room_id in base:
                m.seq = base[m.room_id] + k
                keep.append(m)
        Message.objects.bulk_create(keep)


class _PostgresWriter:
    """The writer's own PostgreSQL connection, on the event loop.

    Made from Django's own connection parameters for the default database
    (`get_connection_params()`: the DATABASE_URL's host, credentials, TLS
    options and `prepare_threshold`), less the two that belong to Django's
    synchronous cursors (its cursor class and its adapters: INSERT_BATCH
    returns integers only). Autocommit: the statement is its own transaction,
    as on the ORM's thread. A connection the server has closed meanwhile is
    noticed before the next statement and replaced; one that breaks during a
    statement fails that batch (it may or may not have committed: it is not
    written again) and the next batch connects again."""

    CONNECT_TIMEOUT = 10  # seconds (libpq's connect_timeout), unless DATABASE_URL says otherwise

    def __init__(self):
        self.conn = None

    async def _connection(self):
        if self.conn is not None and not self.conn.closed and _readable(self.conn.fileno()):
            # Between statements PostgreSQL sends nothing we asked for: anything
            # to read is its goodbye (a restart, pg_terminate_backend, an idle
            # timeout, a proxy's FIN). Connect again instead of failing a batch.
            await self._close()
        if self.conn is None or self.conn.closed or self.conn.broken:
            params = connect_params()
            params.setdefault("connect_timeout", self.CONNECT_TIMEOUT)
            self.conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
        return self.conn

    async def insert(self, messages: list[Message]) -> None:
        ks = _numbered(messages)
        try:
            conn = await self._connection()
            cursor = await conn.execute(INSERT_BATCH, [
                [m.room_id for m in messages], [m.author_id for m in messages], [m.body for m in messages],
                [m.created_at for m in messages], ks,
            ])
            rows = await cursor.fetchall()
        except psycopg.IntegrityError as exc:  # Django's classes, as the ORM's thread raised them
            raise IntegrityError(*exc.args) from exc
        except psycopg.DataError as exc:
            raise DataError(*exc.args) from exc
        except psycopg.Error:
            if self.conn is not None and self.conn.broken:
                await self._close()
            raise
        except BaseException:  # cancelled mid-statement (the worker stopping): no half-read answer kept
            if self.conn is not None:
                await self._close()
            raise
        _assign(messages, ks, rows)

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        try:
            await conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to save
            pass


def connect_params() -> dict:
    """psycopg's connect() arguments for the default database: Django's own
    (`get_connection_params()`), less its cursor class and its adapters."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return params


def _readable(fd: int) -> bool:
    # poll, not select: a worker holding thousands of sockets has descriptors
    # above select()'s FD_SETSIZE (1024), and a reconnect may get one.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _write(writer: BatchWriter, messages: list[Message], committed: Callable[[], None] | None = None) -> None:
    """Write `messages` (see `_insert`): PostgreSQL on the event loop, anything else on the ORM's thread."""
    for m in messages:
        m.seq = m.pk = None  # a retry starts clean (a rolled-back attempt may have set them)
    if connection.vendor == "postgresql":
        await writer.postgres.insert(messages)
    else:
        await _insert(messages, committed)


@database_sync_to_async
def _insert(messages: list[Message], committed: Callable[[], None] | None = None) -> None:
    """Write `messages` (any database but PostgreSQL) and set seq and pk on
    those stored; a message whose room is gone is left without them.
    `committed` runs on the database thread as soon as the rows are committed."""
    _insert_portable(messages)
    if committed is not None:
        transaction.on_commit(committed)  # at once in autocommit; after the outer block otherwise


# A batch failing with one of these is retried row by row; anything else (the
# database is down: OperationalError, InterfaceError, a pool timeout) fails it.
DATA_ERRORS = (IntegrityError, DataError)


class BatchWriter:
    def __init__(self):
        self.pending: list[tuple[Message, asyncio.Future, asyncio.Future | None]] = []
        self.task: asyncio.Task | None = None
        self.postgres = _PostgresWriter()

    async def store(self, room_id, user_id, body, admission: asyncio.Future | None = None) -> Message:
        future = asyncio.get_running_loop().create_future()
        message = Message(room_id=room_id, author_id=user_id, body=body, created_at=timezone.now())
        self.pending.append((message, future, admission))
        if admission is not None and not admission.done():
            admission.add_done_callback(self._wake)  # the writer may be idle by then
        self._wake()
        return await future

    def _wake(self, *_):
        if self.pending and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self._drain())

    def _take_batch(self) -> list[tuple[Message, asyncio.Future]]:
        """The next batch: pending messages whose admission has answered, in
        arrival order. One that said no (or failed) is settled here and not
        written; one still waiting stays pending, so a slow answer for one
        sender holds nobody else's message."""
        batch, waiting = [], []
        for entry in self.pending:
            message, future, admission = entry
            if len(batch) >= MAX_BATCH or (admission is not None and not admission.done()):
                waiting.append(entry)
            elif admission is None or self._admit(future, admission):
                batch.append((message, future))
        self.pending = waiting
        return batch

    @staticmethod
    def _admit(future: asyncio.Future, admission: asyncio.Future) -> bool:
        """True if the (answered) admission lets the message be written; else its sender gets why."""
        if admission.cancelled():
            future.cancel()
        elif admission.exception() is not None:
            if not future.done():
                future.set_exception(admission.exception())
        elif admission.result() is not None:
            if not future.done():
                future.set_exception(NotAdmitted(admission.result()))
        else:
            return True
        return False

    async def _drain(self):
        loop = asyncio.get_running_loop()
        while self.pending:
            batch = self._take_batch()
            if not batch:
                return  # only messages still waiting for their admission: its answer wakes the writer

            def committed(batch=batch):
                # The senders go on (publish) from the database thread's commit:
                # one turn of the event loop, instead of the three that asgiref's
                # way back (the executor's future, a shield, this task) costs.
                loop.call_soon_threadsafe(self._settle_all, batch)

            try:
                try:
                    await _write(self, [message for message, _ in batch], committed)
                except DATA_ERRORS as exc:
                    if len(batch) == 1:
                        raise
                    log.warning("a batch of %d messages failed (%s); writing them one by one", len(batch),
                                type(exc).__name__)
                    await self._one_by_one(batch)
                    continue
            except Exception as exc:  # the database is down: every waiter of this batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            except BaseException:  # cancelled (worker shutting down): nobody waits forever
                for _, future in batch + [(m, f) for m, f, _ in self.pending]:
                    if not future.done():
                        future.set_exception(RuntimeError("message writer stopped"))
                self.pending = []
                raise
            else:
                self._settle_all(batch)  # those `committed` settled already are left alone

    async def _one_by_one(self, batch):
        for n, (message, future) in enumerate(batch):
            try:
                await _write(self, [message])
            except DATA_ERRORS as exc:  # this row is the bad one
                if not future.done():
                    future.set_exception(exc)
            except Exception as exc:  # an outage meanwhile: the rest fail at once, not one timeout each
                for _, waiting in batch[n:]:
                    if not waiting.done():
                        waiting.set_exception(exc)
                return
            else:
                self._settle(message, future)

    @classmethod
    def _settle_all(cls, batch):
        for message, future in batch:
            cls._settle(message, future)

    @staticmethod
    def _settle(message, future):
        if future.done():
            return
        if message.seq is None:
            future.set_exception(RoomGone(f"room {message.room_id} no longer exists"))
        else:
            metrics.stored()
            future.set_result(message)


_writers: dict = {}


async def store_message(room_id, user_id, body, admission: asyncio.Future | None = None) -> Message:
    """Store one message (batched with concurrent ones); returns it with id, seq and created_at.

    `admission`, a future (a task) that answers None (write it) or a reason
    not to (NotAdmitted(reason) is raised, nothing is written): the sender's
    check that still runs, the per-user budget in Redis, overlaps the wait for
    the writer instead of coming before it. A message waits for its answer
    before it joins a batch; an admission that raises fails only its message."""
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        _writers.clear()  # one event loop per worker process; drop a closed one
        writer = _writers[loop] = BatchWriter()
    return await writer.store(room_id, user_id, body, admission)
