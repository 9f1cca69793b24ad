"""Two people in one room, in a real browser (Debian's Chromium via Playwright)."""
import secrets
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.harness.services import Gunicorn
from tests.harness.stack import app_env

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(redis, postgres, stack):
    """The production runtime, reached the way a TLS-terminating proxy would
    forward it (X-Forwarded-Proto: https), with the page's plain-HTTP origin
    trusted for CSRF because this test has no TLS in front."""
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


def sign_up(browser, site, name):
    context = browser.new_context(extra_http_headers={"X-Forwarded-Proto": "https"})
    page = context.new_page()
    page.goto(f"{site}/accounts/signup/")
    page.fill("#id_username", name)
    password = secrets.token_urlsafe(12)
    page.fill("#id_password1", password)
    page.fill("#id_password2", password)
    page.click("#signup-form button[type=submit]")
    expect(page.locator("h2")).to_have_text("Rooms")
    return page


def say(page, text):
    page.fill("#send-form input[name=message]", text)
    page.click("#send-form button[type=submit]")


def test_two_users_see_each_others_messages_without_reloading(browser, site, tmp_path):
    alice = sign_up(browser, site, f"alice-{secrets.token_hex(3)}")
    bob = sign_up(browser, site, f"bob-{secrets.token_hex(3)}")
    room_name = f"Browser room {secrets.token_hex(3)}"
    alice.fill("#id_name", room_name)
    alice.click("#create-room button[type=submit]")
    expect(alice.locator("h2")).to_contain_text(room_name)
    bob.goto(alice.url)
    for page in (alice, bob):
        expect(page.locator("#ws-status")).to_have_attribute("data-state", "open")
    bob_url_before = bob.url

    say(alice, "hello <b>bob</b>")
    expect(bob.locator("#messages .msg .body").last).to_have_text("hello <b>bob</b>")
    assert bob.locator("#messages .msg .body b").count() == 0  # shown as text, not markup
    say(bob, "hi alice")
    expect(alice.locator("#messages .msg .body").last).to_have_text("hi alice")
    expect(alice.locator("#send-form input[name=message]")).to_have_value("")

    assert bob.url == bob_url_before  # no reload, no navigation
    for page in (alice, bob):
        expect(page.locator("#messages .msg")).to_have_count(2)  # each message once
    bob.screenshot(path=str(tmp_path / "bob.png"))

    # A reload shows the same history, rendered by the server.
    alice.reload()
    expect(alice.locator("#messages .msg .body")).to_have_text(["hello <b>bob</b>", "hi alice"])
