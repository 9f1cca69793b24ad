"""The room page when the server ends its socket for good, in a real browser
(Debian's Chromium via Playwright, the production runtime behind a pretend
TLS proxy): after a logout in another tab it shows "signed out" and a way to
sign in again, after the room is deleted "room deleted" and a way back, and
in both cases it stops (no reconnect loop), while another person's page in
the same room stays connected.
"""
import secrets
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.browser.test_two_users import ARGS, CHROMIUM, say
from tests.faults import accounts
from tests.harness.services import Gunicorn
from tests.harness.stack import app_env

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(redis, postgres, stack):
    """As in test_two_users.py: the production runtime behind a pretend TLS proxy."""
    env = app_env(redis, postgres)
    env["CSRF_TRUSTED_ORIGINS"] = f"http://127.0.0.1:{env['PORT']}"
    gunicorn = Gunicorn(env).start()
    yield gunicorn
    gunicorn.stop()


@pytest.fixture(scope="module")
def site(server):
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def signed_in_page(browser, site, server):
    """A signed-in page of a new account. The account and its session are
    written to the database (tests/faults/accounts.py) instead of signing up
    through the form: the form is test_two_users.py's, and sign-ups from
    127.0.0.1 share one small hourly budget with every other test."""
    (account,) = accounts.seed(server.env, 1)
    context = browser.new_context(extra_http_headers={"X-Forwarded-Proto": "https"})
    context.add_cookies([{"name": "sessionid", "value": account.sessions[0], "url": site}])
    page = context.new_page()
    page.goto(f"{site}/")
    expect(page.locator("h2")).to_have_text("Rooms")
    return page


def sockets_opened(page) -> list:
    opened = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    return opened


def create_room(page) -> None:
    page.fill("#id_name", f"Ending room {secrets.token_hex(3)}")
    page.click("#create-room button[type=submit]")
    expect(page.locator("#ws-status")).to_have_attribute("data-state", "open")


def test_logout_elsewhere_shows_signed_out_and_stops(browser, site, server):
    alice = signed_in_page(browser, site, server)
    bob = signed_in_page(browser, site, server)
    create_room(alice)
    opened = sockets_opened(bob)
    bob.goto(alice.url)
    expect(bob.locator("#ws-status")).to_have_attribute("data-state", "open")
    opened_alice = sockets_opened(alice)

    # Alice logs out in another tab of the same browser (same session cookie).
    other_tab = alice.context.new_page()
    other_tab.goto(f"{site}/")
    other_tab.click("header.top form button[type=submit]")
    expect(other_tab.locator("#id_username")).to_be_visible()  # the login page

    expect(alice.locator("#ws-status")).to_have_text("signed out")
    expect(alice.locator("#ws-status")).to_have_attribute("data-state", "ended")
    expect(alice.locator("#chat-error")).to_have_attribute("data-error", "signed_out")
    expect(alice.locator("#chat-ended")).to_be_visible()
    expect(alice.locator("#chat-sign-in")).to_be_visible()
    expect(alice.locator("#send-form input[name=message]")).to_be_disabled()
    time.sleep(2)  # htmx-ext-ws would have retried by now (its first delay is under a second)
    assert opened_alice == [], f"the page reconnected after being signed out: {opened_alice}"
    expect(alice.locator("#ws-status")).to_have_text("signed out")

    # positive control: Bob's page stays connected and still works
    expect(bob.locator("#ws-status")).to_have_attribute("data-state", "open")
    say(bob, "still here")
    expect(bob.locator("#messages .msg .body").last).to_have_text("still here")
    assert len(opened) == 1

    # the link signs in again and comes back to the room
    alice.click("#chat-sign-in")
    expect(alice.locator("#id_username")).to_be_visible()
    assert "next=" in alice.url


def test_room_deleted_shows_room_deleted_and_stops(browser, site, server):
    alice = signed_in_page(browser, site, server)
    bob = signed_in_page(browser, site, server)
    create_room(alice)
    room_url = alice.url
    carol = signed_in_page(browser, site, server)
    create_room(carol)  # another room: must not be affected
    bob.goto(room_url)
    expect(bob.locator("#ws-status")).to_have_attribute("data-state", "open")
    expect(bob.locator("#delete-room")).to_have_count(0)  # only the creator gets the button
    opened = sockets_opened(bob)

    alice.click("#delete-room button[type=submit]")
    expect(alice.locator("h2")).to_have_text("Rooms")

    expect(bob.locator("#ws-status")).to_have_text("room deleted")
    expect(bob.locator("#chat-error")).to_have_attribute("data-error", "room_deleted")
    expect(bob.locator("#chat-rooms")).to_be_visible()
    time.sleep(2)
    assert opened == [], f"the page reconnected to a deleted room: {opened}"
    expect(carol.locator("#ws-status")).to_have_attribute("data-state", "open")  # positive control
    bob.click("#chat-rooms")
    expect(bob.locator("h2")).to_have_text("Rooms")
