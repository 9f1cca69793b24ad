"""The handshake's three row reads (session, user, room) as plain SQL.

Every websocket handshake reads one row each of django_session, the user
table and chat_room, on the worker's one database thread. Through the ORM
most of that thread's CPU went into building and compiling the queries, not
into PostgreSQL. `python -m bench.handshake_reads` (the production venv and
settings against the benchmark's PostgreSQL, 2026-12-07): the three reads
through Django's SessionStore.load, ModelBackend.get_user and
`Room.objects.filter(pk=...).first()` took 2.0-2.3 ms of thread CPU per
handshake, the same rows read here 0.73-0.78 ms. Under a churn of reconnects
that thread sets the pace (app/chat/db_hops.py).

What stays Django's: the session is decoded by the session store itself
(`decode`: signature, SECRET_KEY_FALLBACKS, a tampered cookie gives an empty
session), the user is checked by the backend's own `user_can_authenticate`,
and the session hash by the same code as Channels' `get_user` (below). The
rows become model instances through `Model.from_db`, with the converters the
ORM would apply for the database in use (`RowReader`), so the instances are
the ones a queryset would give; tests/unit/test_handshake_reads.py pins that
against the ORM's answers, case by case.

Where this does not know the answer it asks the ORM: a session engine that
is not the database one, an authentication backend that is not exactly
ModelBackend, a user model whose default manager filters rows.
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.contrib.auth.backends import ModelBackend
from django.contrib.sessions.backends import db as db_sessions
from django.db import connections, models, router
from django.utils import timezone
from django.utils.crypto import constant_time_compare

DB_SESSION_ENGINE = "django.contrib.sessions.backends.db"


class RowReader:
    """SELECT every concrete column of `model` WHERE pk = %s, as the model
    instance a queryset would return (Model.from_db, the ORM's converters
    applied), or None. One per model; the SQL is built once per database."""

    def __init__(self, model):
        self.model = model
        self.key_field = model._meta.pk
        self.fields = list(model._meta.concrete_fields)
        self.attnames = [f.attname for f in self.fields]
        self._per_alias = {}

    def _prepared(self, alias):
        prepared = self._per_alias.get(alias)
        if prepared is None:
            connection = connections[alias]
            quote = connection.ops.quote_name
            sql = "SELECT {} FROM {} WHERE {} = %s".format(
                ", ".join(quote(f.column) for f in self.fields), quote(self.model._meta.db_table),
                quote(self.key_field.column))
            # The converters SQLCompiler.get_converters finds for these columns
            # (SQLite: text to datetime, 0/1 to bool; PostgreSQL: usually none).
            converters = []
            for position, field in enumerate(self.fields):
                col = field.get_col(self.model._meta.db_table)
                found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
                if found:
                    converters.append((position, found, col))
            prepared = self._per_alias[alias] = (sql, converters)
        return prepared

    def get(self, value, alias=None):
        alias = alias or router.db_for_read(self.model)
        connection = connections[alias]
        sql, converters = self._prepared(alias)
        value = self.key_field.get_db_prep_value(value, connection)
        if isinstance(self.key_field, models.IntegerField) and value is not None:
            # The ORM matches nothing for a number the column cannot hold
            # (a room id of 30 digits in a URL); the database would raise.
            low, high = connection.ops.integer_field_range(self.key_field.get_internal_type())
            if not low <= value <= high:
                return None
        with connection.cursor() as cursor:
            cursor.execute(sql, [value])
            row = cursor.fetchone()
        if row is None:
            return None
        if converters:
            row = list(row)
            for position, found, col in converters:
                value = row[position]
                for convert in found:
                    value = convert(value, col, connection)
                row[position] = value
        return self.model.from_db(alias, self.attnames, row)


_readers: dict = {}


def reader(model) -> RowReader:
    found = _readers.get(model)
    if found is None:
        found = _readers[model] = RowReader(model)
    return found


class SessionStore(db_sessions.SessionStore):
    """django.contrib.sessions' database store whose `load` reads the row with
    plain SQL; everything else (decode, save, flush) is the store's own."""

    _sql: dict = {}

    def load(self):
        key = self.session_key  # None when the cookie's key is not valid (too short)
        if key is not None:
            alias = router.db_for_read(self.model)
            connection = connections[alias]
            sql = self._sql.get(alias)
            if sql is None:
                quote, meta = connection.ops.quote_name, self.model._meta
                sql = self._sql[alias] = "SELECT {} FROM {} WHERE {} = %s AND {} > %s".format(
                    quote(meta.get_field("session_data").column), quote(meta.db_table),
                    quote(meta.get_field("session_key").column), quote(meta.get_field("expire_date").column))
            with connection.cursor() as cursor:
                cursor.execute(sql, [key, connection.ops.adapt_datetimefield_value(timezone.now())])
                row = cursor.fetchone()
            if row is not None:
                return self.decode(row[0])
        self._session_key = None  # as the store does for a missing or expired row
        return {}


def session_store():
    """The session store class for a websocket handshake: this one for the
    database engine, the configured engine's own otherwise."""
    from importlib import import_module

    if settings.SESSION_ENGINE == DB_SESSION_ENGINE:
        return SessionStore
    return import_module(settings.SESSION_ENGINE).SessionStore


def _plain_default_manager(model) -> bool:
    manager = model._default_manager
    return type(manager).get_queryset is models.Manager.get_queryset


def backend_user(backend, user_id):
    """backend.get_user(user_id), with the row read by RowReader when the
    backend is exactly ModelBackend over a user model whose default manager
    returns every row (what ModelBackend.get_user reads with `.get(pk=)`)."""
    user_model = get_user_model()
    if type(backend) is not ModelBackend or not _plain_default_manager(user_model):
        return backend.get_user(user_id)
    user = reader(user_model).get(user_id)
    if user is None:
        return None
    return user if backend.user_can_authenticate(user) else None


def get_user(scope):
    """Channels' `channels.auth.get_user` (4.3), synchronous, with the user
    row read by `backend_user`. The rest is the same code: the backend must be
    one of AUTHENTICATION_BACKENDS, and a session whose auth hash does not
    match the user's (a password change) is flushed and gives no user."""
    from django.contrib.auth.models import AnonymousUser

    if "session" not in scope:
        raise ValueError("Cannot find session in scope. You should wrap your consumer in SessionMiddleware.")
    session = scope["session"]
    user = None
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])  # stored as a string
        backend_path = session[BACKEND_SESSION_KEY]
    except KeyError:
        pass
    else:
        if backend_path in settings.AUTHENTICATION_BACKENDS:
            user = backend_user(load_backend(backend_path), user_id)
            if hasattr(user, "get_session_auth_hash"):
                session_hash = session.get(HASH_SESSION_KEY)
                session_hash_verified = session_hash and constant_time_compare(
                    session_hash, user.get_session_auth_hash())
                if not session_hash_verified:
                    session.flush()
                    user = None
    return user or AnonymousUser()


def room(room_model, room_id):
    """The room with this pk, or None: `Room.objects.filter(pk=room_id).first()`."""
    return reader(room_model).get(room_id)
