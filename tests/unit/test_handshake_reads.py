"""app/chat/handshake_reads.py: the handshake's session, user and room rows
read with plain SQL must give exactly what Django's and Channels' own code
gives, case by case: each test compares with the ORM path on the same rows
(the positive and the negative cases side by side), and the fast path is
shown to be taken (the ORM's query methods fail while it runs)."""
from datetime import timedelta

import pytest
from channels.auth import get_user as channels_get_user
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import AnonymousUser, User
from django.contrib.sessions.backends.db import SessionStore as DjangoStore
from django.contrib.sessions.models import Session
from django.db.models.query import QuerySet
from django.utils import timezone

from app.chat import handshake_reads
from app.chat.handshake_reads import SessionStore
from app.chat.models import Room

pytestmark = pytest.mark.django_db

MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


@pytest.fixture
def no_orm_reads(monkeypatch):
    """While set, a queryset .get()/.first() fails: what passes read without the ORM."""
    def refused(*args, **kwargs):
        raise AssertionError("the ORM was asked")

    monkeypatch.setattr(QuerySet, "get", refused)
    monkeypatch.setattr(QuerySet, "first", refused)


def values(instance):
    return [(f.attname, getattr(instance, f.attname)) for f in type(instance)._meta.concrete_fields]


def logged_in(user, backend=MODEL_BACKEND, expire=timedelta(days=1), hash_=None):
    store = DjangoStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = backend
    store[HASH_SESSION_KEY] = user.get_session_auth_hash() if hash_ is None else hash_
    store.save()
    Session.objects.filter(session_key=store.session_key).update(expire_date=timezone.now() + expire)
    return store.session_key


# --- rows as model instances ---------------------------------------------------

def test_a_user_row_is_the_instance_the_orm_gives():
    user = User.objects.create_user("alice", password="pw-unused-123", email="a@example.com")
    User.objects.filter(pk=user.pk).update(last_login=timezone.now())  # a datetime column: SQLite converts it
    expected = User.objects.get(pk=user.pk)
    got = handshake_reads.reader(User).get(user.pk)
    assert values(got) == values(expected)
    assert [type(v) for _, v in values(got)] == [type(v) for _, v in values(expected)]
    assert got._state.adding is False and got._state.db == expected._state.db
    assert got.is_authenticated and got.get_session_auth_hash() == expected.get_session_auth_hash()


def test_a_room_row_is_the_instance_the_orm_gives_and_a_missing_one_is_none(no_orm_reads):
    room = Room.objects.create(name="lobby", last_seq=7)
    got = handshake_reads.room(Room, room.pk)
    assert isinstance(got, Room) and got.pk == room.pk and got.last_seq == 7 and got.name == "lobby"
    assert got.created_at == room.created_at
    assert handshake_reads.room(Room, room.pk + 1) is None


def test_a_room_id_no_column_can_hold_matches_nothing_as_in_the_orm():
    """A URL can carry a 30-digit room id: the ORM matches nothing; a plain
    query with it would raise (SQLite OverflowError, PostgreSQL out of range)."""
    Room.objects.create(name="lobby")
    for huge in (10**30, -(10**30), 2**63):
        assert Room.objects.filter(pk=huge).first() is None
        assert handshake_reads.room(Room, huge) is None
    assert handshake_reads.room(Room, 2**63 - 1) is None  # the largest the column holds: asked, not found


# --- the session row -------------------------------------------------------------

def test_a_live_session_loads_as_djangos_store_loads_it(no_orm_reads):
    user = User.objects.create_user("alice", password="pw-unused-123")
    key = logged_in(user)
    fast = SessionStore(key)
    assert fast.load() == {SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: MODEL_BACKEND,
                           HASH_SESSION_KEY: user.get_session_auth_hash()}
    assert fast.session_key == key


@pytest.mark.parametrize("case", ["expired", "unknown", "tampered", "short key", "no key"])
def test_a_session_that_is_not_valid_loads_empty_in_both(case):
    user = User.objects.create_user("alice", password="pw-unused-123")
    key = logged_in(user, expire=timedelta(seconds=-1) if case == "expired" else timedelta(days=1))
    if case == "unknown":
        key = "x" * 32
    elif case == "tampered":
        Session.objects.filter(session_key=key).update(session_data="eyJ4IjoxfQ:1vXXXX:forged-signature")
    elif case == "short key":
        key = "abc"
    elif case == "no key":
        key = None
    django_store, fast = DjangoStore(key), SessionStore(key)
    assert fast.load() == django_store.load() == {}
    assert fast.session_key == django_store.session_key  # the row's key, kept for a tampered one
    assert (fast.session_key is None) == (case != "tampered")


def test_the_live_control_for_the_invalid_sessions_is_not_empty():
    user = User.objects.create_user("alice", password="pw-unused-123")
    key = logged_in(user)
    assert SessionStore(key).load() == DjangoStore(key).load() != {}


def test_the_store_is_used_only_for_the_database_engine(settings):
    assert handshake_reads.session_store() is SessionStore
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.cache"
    from django.contrib.sessions.backends.cache import SessionStore as CacheStore

    assert handshake_reads.session_store() is CacheStore


# --- the user, as Channels' get_user decides ---------------------------------

def both_users(key):
    """(ours, Channels') user for a handshake with this session key."""
    ours = handshake_reads.get_user({"session": SessionStore(key)})
    theirs = channels_get_user.func({"session": DjangoStore(key)})
    return ours, theirs


def test_a_logged_in_user_is_found_without_the_orm(no_orm_reads):
    user = User.objects.create_user("alice", password="pw-unused-123")
    ours = handshake_reads.get_user({"session": SessionStore(logged_in(user))})
    assert ours.is_authenticated and ours.pk == user.pk and values(ours) == values(user)


def test_logged_in_the_same_as_channels():
    user = User.objects.create_user("alice", password="pw-unused-123")
    ours, theirs = both_users(logged_in(user))
    assert ours.is_authenticated and theirs.is_authenticated
    assert values(ours) == values(theirs)


@pytest.mark.parametrize("case", ["password changed", "inactive", "deleted", "unknown backend", "no hash",
                                  "anonymous session"])
def test_refused_the_same_as_channels(case):
    user = User.objects.create_user("alice", password="pw-unused-123")
    key = logged_in(user, backend="app.nowhere.Backend" if case == "unknown backend" else MODEL_BACKEND,
                    hash_="" if case == "no hash" else None)
    if case == "password changed":
        user.set_password("another-pw-456")
        user.save()
    elif case == "inactive":
        User.objects.filter(pk=user.pk).update(is_active=False)
    elif case == "deleted":
        user.delete()
    elif case == "anonymous session":
        key = None
    ours, theirs = both_users(key)
    assert isinstance(ours, AnonymousUser) and isinstance(theirs, AnonymousUser)


def test_a_refused_hash_flushes_the_session_as_channels_does():
    user = User.objects.create_user("alice", password="pw-unused-123")
    key = logged_in(user)
    user.set_password("another-pw-456")
    user.save()
    session = SessionStore(key)
    assert isinstance(handshake_reads.get_user({"session": session}), AnonymousUser)
    assert not Session.objects.filter(session_key=key).exists()  # flush() deleted the row


def test_another_backend_is_asked_itself(no_orm_reads):
    """A backend that is not exactly ModelBackend (here its subclass that
    lets inactive users in) answers through its own get_user: the ORM."""
    from django.contrib.auth.backends import AllowAllUsersModelBackend

    user = User.objects.create_user("alice", password="pw-unused-123")
    with pytest.raises(AssertionError, match="the ORM was asked"):
        handshake_reads.backend_user(AllowAllUsersModelBackend(), user.pk)


def test_the_websocket_stack_reads_through_this_module():
    from app.chat import session_scope

    assert session_scope.get_user.func is handshake_reads.get_user
