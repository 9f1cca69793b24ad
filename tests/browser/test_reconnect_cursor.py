"""room.js in a real browser: the page reconnects with the cursor below which
it shows every message, not the newest it shows, and shows each message once,
in room order.

The page's websocket goes through Playwright's WebSocket route, which holds
back one frame (seq 1) while the next (seq 2) reaches the page: what a client
sees when two workers publish out of order. Then the route closes the socket,
htmx-ext-ws reconnects, and the replay must bring seq 1.
"""
import re
import secrets
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.browser.test_two_users import ARGS, CHROMIUM, say, sign_up
from tests.harness.services import Gunicorn
from tests.harness.stack import app_env

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(redis, postgres, stack):
    """As in test_two_users.py: the production runtime behind a pretend TLS proxy."""
    env = app_env(redis, postgres)
    env["CSRF_TRUSTED_ORIGINS"] = f"http://127.0.0.1:{env['PORT']}"
    server = Gunicorn(env).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_page_reconnects_with_its_contiguous_cursor_and_shows_each_message_once(browser, site):
    alice = sign_up(browser, site, f"alice-{secrets.token_hex(3)}")
    bob = sign_up(browser, site, f"bob-{secrets.token_hex(3)}")
    alice.fill("#id_name", f"Cursor room {secrets.token_hex(3)}")
    alice.click("#create-room button[type=submit]")
    expect(alice.locator("#ws-status")).to_have_attribute("data-state", "open")

    connections = []  # the URL of every websocket bob's page opens
    held = []

    def route(ws):
        connections.append(ws.url)
        server = ws.connect_to_server()
        first = len(connections) == 1

        def from_server(message):
            if first and 'data-seq="1"' in message:
                held.append(message)  # published late: never reaches this connection
                return
            ws.send(message)

        server.on_message(from_server)
        ws.on_message(lambda message: server.send(message))
        route.current = (ws, server)

    bob.route_web_socket(re.compile(r"/ws/rooms/\d+/"), route)
    bob.goto(alice.url)
    expect(bob.locator("#ws-status")).to_have_attribute("data-state", "open")

    say(alice, "one")
    expect(alice.locator("#messages .msg .body")).to_have_text(["one"])
    say(alice, "two")
    expect(bob.locator("#messages .msg .body")).to_have_text(["two"])  # 2 arrived, 1 did not
    assert held, "the route never saw seq 1"

    page_side, server_side = route.current
    server_side.close()
    page_side.close(code=1012, reason="restart")  # htmx-ext-ws reconnects
    deadline = time.monotonic() + 15
    while len(connections) < 2:
        assert time.monotonic() < deadline, f"the page did not reconnect: {connections}"
        bob.wait_for_timeout(100)
    assert connections[1].endswith("?after=0"), connections  # 1 is missing: the cursor stays below it

    # The replay sends 1 and 2; the page shows 1, drops 2 (already shown), keeps room order.
    expect(bob.locator("#messages .msg .body")).to_have_text(["one", "two"])
    bob.wait_for_timeout(300)
    expect(bob.locator("#messages .msg")).to_have_count(2)
    assert bob.locator("#messages .msg").evaluate_all("els => els.map(e => e.dataset.seq)") == ["1", "2"]

    # Nothing missing any more: the next reconnect asks for what follows 2.
    page_side, server_side = route.current
    server_side.close()
    page_side.close(code=1012, reason="restart")
    deadline = time.monotonic() + 15
    while len(connections) < 3:
        assert time.monotonic() < deadline, f"the page did not reconnect: {connections}"
        bob.wait_for_timeout(100)
    assert connections[2].endswith("?after=2"), connections
    say(alice, "three")
    expect(bob.locator("#messages .msg .body")).to_have_text(["one", "two", "three"])
