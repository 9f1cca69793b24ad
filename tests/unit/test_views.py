import re

import pytest
from django.contrib.auth.models import User
from django.contrib.sites.models import Site
from django.core.management import call_command

from app.chat.models import Message, Room
from app.websockets import websocket_absolute_url, websocket_reverse

pytestmark = pytest.mark.django_db

HOST = {"HTTP_HOST": "chat.example.com"}


@pytest.fixture
def alice(client):
    user = User.objects.create_user("alice", password="pw-unused-123")
    client.force_login(user)
    return user


def test_signup_logs_in_and_lands_on_rooms(client):
    r = client.post("/accounts/signup/", {"username": "newbie", "password1": "a-Long-pass-42", "password2": "a-Long-pass-42"}, **HOST)
    assert r.status_code == 302 and r["Location"] == "/"
    assert client.get("/", **HOST).status_code == 200


def test_rooms_need_login(client):
    r = client.get("/", **HOST)
    assert r.status_code == 302 and r["Location"].startswith("/accounts/login/")


def test_create_room_and_open_it(client, alice):
    r = client.post("/", {"name": "  Team   room "}, **HOST)
    room = Room.objects.get()
    assert room.name == "Team room" and r["Location"] == f"/rooms/{room.pk}/"
    page = client.get(r["Location"], **HOST).content.decode()
    assert f'ws-connect="/ws/rooms/{room.pk}/"' in page
    assert f'data-ws-url="wss://chat.example.com/ws/rooms/{room.pk}/"' in page
    assert "htmx-2.0.11.min.js" in page and "htmx-ext-ws-2.0.4.min.js" in page


def test_room_page_shows_the_last_50_messages_escaped(client, alice, settings):
    room = Room.objects.create(name="r")
    for n in range(60):
        Message.objects.create(room=room, author=alice, body=f"<i>m{n}</i>")
    page = client.get(f"/rooms/{room.pk}/", **HOST).content.decode()
    bodies = re.findall(r'<p class="body">&lt;i&gt;m(\d+)&lt;/i&gt;</p>', page)
    assert bodies == [str(n) for n in range(10, 60)]
    assert re.findall(r'data-seq="(\d+)"', page) == [str(n) for n in range(11, 61)]
    assert 'data-last-seq="60"' in page  # the page's reconnect cursor


def test_unknown_room_is_404(client, alice):
    assert client.get("/rooms/999/", **HOST).status_code == 404


def test_websocket_url_helpers(settings):
    assert websocket_reverse("ws_group_chat", args=[7]) == "/ws/rooms/7/"
    assert websocket_reverse("ws_group_chat", kwargs={"room_id": 8}) == "/ws/rooms/8/"
    settings.USE_HTTPS_IN_ABSOLUTE_URLS = False
    assert websocket_absolute_url("/ws/rooms/7/") == "ws://chat.example.com/ws/rooms/7/"
    settings.USE_HTTPS_IN_ABSOLUTE_URLS = True
    assert websocket_absolute_url("/ws/rooms/7/") == "wss://chat.example.com/ws/rooms/7/"


def test_migrate_keeps_the_site_domain_in_step(settings):
    Site.objects.filter(pk=1).update(domain="example.com")
    Site.objects.clear_cache()
    settings.SITE_DOMAIN = "chat.example.org"
    call_command("migrate", verbosity=0)
    assert Site.objects.get(pk=1).domain == "chat.example.org"


def test_healthz_and_readyz(client):
    assert client.get("/healthz", **HOST).json() == {"status": "ok"}
    r = client.get("/readyz", **HOST)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "channel_layer": "ok"}}


def test_health_is_exempt_from_https_redirect_but_pages_are_not(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz", **HOST).status_code == 200
    r = client.get("/accounts/login/", **HOST)
    assert r.status_code == 301 and r["Location"] == "https://chat.example.com/accounts/login/"
    assert client.get("/accounts/login/", secure=True, **HOST).status_code == 200


def _handled(exc, rf):
    from app.errors import server_error

    request = rf.get("/")
    try:
        raise exc
    except Exception:
        return server_error(request)


def test_database_outage_is_a_503_page_without_a_traceback(rf, caplog):
    from django.db import InterfaceError, OperationalError

    for exc in (OperationalError("connection failed: Connection refused\nIs the server running?"), InterfaceError("closed")):
        caplog.clear()
        r = _handled(exc, rf)
        assert r.status_code == 503 and r["Retry-After"] == "5" and r["Cache-Control"] == "no-store"
        assert b"Temporarily unavailable" in r.content
        assert r._has_been_logged  # so Django's log_response adds no traceback
        [record] = [rec for rec in caplog.records if rec.name == "app.errors"]
        assert record.levelname == "WARNING" and not record.exc_info
        assert str(exc).splitlines()[0] in record.getMessage()


def test_other_errors_stay_500(rf):
    r = _handled(ZeroDivisionError("a bug"), rf)
    assert r.status_code == 500 and not getattr(r, "_has_been_logged", False)


def test_handler500_is_wired():
    from app import urls

    assert urls.handler500 == "app.errors.server_error"


def test_room_list_is_paginated(client, alice, settings):
    settings.CHAT_ROOMS_PER_PAGE = 50
    Room.objects.bulk_create(Room(name=f"room {n:03d}") for n in range(120))
    first = client.get("/", **HOST).content.decode()
    assert first.count('<li><a href="/rooms/') == 50 and "room 000" in first and "room 050" not in first
    assert 'href="?page=2"' in first and "Page 1 of 3" in first
    last = client.get("/?page=3", **HOST).content.decode()
    assert last.count('<li><a href="/rooms/') == 20 and "room 119" in last and 'rel="next"' not in last
    # a page number that is not one shows a page, not an error
    for bad in ("99", "abc", "-1"):
        assert client.get(f"/?page={bad}", **HOST).status_code == 200


def test_rooms_created_per_user_are_limited(client, alice, settings):
    settings.CHAT_USER_ROOMS_PER_HOUR = 3
    statuses = [client.post("/", {"name": f"spam {n}"}, **HOST).status_code for n in range(4)]
    assert statuses == [302, 302, 302, 429]
    refused = client.post("/", {"name": "spam 5"}, **HOST)
    assert refused["Retry-After"] == "1200" and "You created many rooms recently" in refused.content.decode()
    assert Room.objects.count() == 3
    # positive control: another user still creates rooms
    client.force_login(User.objects.create_user("bob", password="pw-unused-123"))
    assert client.post("/", {"name": "bob's room"}, **HOST).status_code == 302


def test_room_limit_store_down_is_a_form_error_not_a_500(client, alice, settings):
    settings.CHAT_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"
    r = client.post("/", {"name": "while redis is down"}, **HOST)
    assert r.status_code == 503 and "Rooms cannot be created right now" in r.content.decode()
    assert not Room.objects.exists()


def test_a_taken_room_name_is_a_form_error(client, alice):
    Room.objects.create(name="taken")
    r = client.post("/", {"name": "taken"}, **HOST)
    assert r.status_code == 200 and "Room with this Name already exists." in r.content.decode()


def test_room_deletion_by_its_creator_or_staff_only(client, alice):
    from django.test import Client

    room = Room.objects.create(name="doomed", created_by=alice)
    Message.objects.create(room=room, author=alice, body="bye")
    page = client.get(f"/rooms/{room.pk}/", **HOST).content.decode()
    assert 'id="delete-room"' in page  # the creator sees the button
    assert client.get(f"/rooms/{room.pk}/delete/", **HOST).status_code == 405  # POST only

    bob = Client()
    bob.force_login(User.objects.create_user("bob", password="pw-unused-123"))
    assert 'id="delete-room"' not in bob.get(f"/rooms/{room.pk}/", **HOST).content.decode()
    refused = bob.post(f"/rooms/{room.pk}/delete/", **HOST)
    assert refused.status_code == 403 and Room.objects.filter(pk=room.pk).exists()

    r = client.post(f"/rooms/{room.pk}/delete/", **HOST)
    assert r.status_code == 302 and r["Location"] == "/"
    assert not Room.objects.filter(pk=room.pk).exists() and not Message.objects.exists()

    other = Room.objects.create(name="someone else's", created_by=alice)
    staff = Client()
    staff.force_login(User.objects.create_user("admin", password="pw-unused-123", is_staff=True))
    assert staff.post(f"/rooms/{other.pk}/delete/", **HOST).status_code == 302
    assert client.post("/rooms/999999/delete/", **HOST).status_code == 404
