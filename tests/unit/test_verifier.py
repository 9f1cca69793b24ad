"""The black-box verifier's own checks can fail (tests/contract/verify.py).

The checks run unchanged; only the transport differs: their HTTP goes to the
real Django app in-process (httpx's WSGI transport) or to a small planted
WSGI app, instead of over TCP. Each check has its positive control (the app as
configured passes) and negative controls (a planted bad answer fails it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.core.wsgi import get_wsgi_application

from tests.contract import verify

pytestmark = pytest.mark.django_db  # the app's request signals touch the database

SITE = "chat.example.com"


@dataclass
class InProcess(verify.Endpoint):
    """An Endpoint whose HTTP requests go to a WSGI app, not to `url`."""

    app: Any = None

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.WSGITransport(app=self.app), base_url=self.url, timeout=10, follow_redirects=False)


def context(url: str, *, https_proxy: bool, app=None, http_url: str | None = None) -> verify.Context:
    return verify.Context(InProcess(url, SITE, https_proxy, False, app or get_wsgi_application()), http_url=http_url)


def redirecting_to(location: str | None):
    def app(environ, start_response):
        if location is None:
            start_response("200 OK", [("Content-Type", "text/html")])
            return [b"<form>the login page over plain HTTP</form>"]
        start_response("301 Moved Permanently", [("Location", location)])
        return [b""]
    return app


# --- the session cookie after login -----------------------------------------

DJANGO_SESSION = "sessionid=abc; expires=Tue, 15 Dec 2026 10:00:00 GMT; HttpOnly; Max-Age=1209600; Path=/; SameSite=Lax; Secure"


@pytest.mark.parametrize("header, missing", [
    (DJANGO_SESSION, []),
    ("sessionid=abc; HttpOnly; Path=/; SameSite=Strict; Secure", []),
    ("sessionid=abc; HttpOnly; Path=/; SameSite=Lax", ["Secure"]),
    ("sessionid=abc; Path=/; SameSite=Lax; Secure", ["HttpOnly"]),
    ("sessionid=abc; HttpOnly; Path=/; Secure", ["SameSite=Lax or Strict"]),
    ("sessionid=abc; HttpOnly; Path=/; SameSite=None; Secure", ["SameSite=Lax or Strict"]),
    ("sessionid=secure-httponly; Path=/", ["Secure", "HttpOnly", "SameSite=Lax or Strict"]),  # flags in the value do not count
])
def test_cookie_flag_problems_on_planted_headers(header, missing):
    assert verify.cookie_flag_problems(header) == missing


@pytest.fixture
def signed_up(monkeypatch):
    monkeypatch.delenv("CHAT_VERIFY_USERS", raising=False)  # the throwaway sign-up path


def test_session_cookie_check_passes_on_the_app_as_configured(signed_up):
    ctx = context(f"http://{SITE}", https_proxy=True)
    verify.check_session_cookie_after_login(ctx)
    assert "sessionid" in ctx.users[0].set_cookie


@pytest.mark.parametrize("setting, value, flag", [
    ("SESSION_COOKIE_SECURE", False, "Secure"),
    ("SESSION_COOKIE_HTTPONLY", False, "HttpOnly"),
    ("SESSION_COOKIE_SAMESITE", None, "SameSite"),
    ("SESSION_COOKIE_SAMESITE", "None", "SameSite"),
])
def test_session_cookie_check_fails_when_a_flag_is_off(signed_up, settings, setting, value, flag):
    setattr(settings, setting, value)
    ctx = context(f"http://{SITE}", https_proxy=True)
    with pytest.raises(verify.CheckFailed, match=f"session cookie lacks .*{flag}") as failure:
        verify.check_session_cookie_after_login(ctx)
    assert ctx.users[0].cookies["sessionid"] not in str(failure.value), "the session itself is printed"


# --- the HTTPS redirect -------------------------------------------------------

def test_redirect_on_a_non_443_https_port_without_http_url_fails():
    """It used to count as passed without any request (every VM contract run)."""
    ctx = context(f"https://127.0.0.1:8443", https_proxy=False, app=redirecting_to(f"https://{SITE}/accounts/login/?next=/"))
    with pytest.raises(verify.CheckFailed, match="pass --http-url"):
        verify.check_https_redirect(ctx)


@pytest.mark.parametrize("url, https_proxy, http_url", [
    ("https://127.0.0.1:8443", False, "http://127.0.0.1:8080"),  # a TLS front door on a test port (the VM lab)
    (f"https://{SITE}", False, None),  # 443: plain HTTP is port 80 of the same host
    ("http://127.0.0.1:8000", True, None),  # behind a TLS-terminating router: the same address without the header
])
def test_redirect_check_passes_on_the_app_with_ssl_redirect(settings, url, https_proxy, http_url):
    settings.SECURE_SSL_REDIRECT = True
    verify.check_https_redirect(context(url, https_proxy=https_proxy, http_url=http_url))


@pytest.mark.parametrize("url, https_proxy, http_url", [
    ("https://127.0.0.1:8443", False, "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8000", True, None),
])
def test_redirect_check_fails_when_plain_http_is_served(settings, url, https_proxy, http_url):
    settings.SECURE_SSL_REDIRECT = False
    with pytest.raises(verify.CheckFailed, match="not a redirect"):
        verify.check_https_redirect(context(url, https_proxy=https_proxy, http_url=http_url))


@pytest.mark.parametrize("location, passes", [
    (f"https://{SITE}/accounts/login/?next=/", True),
    (f"https://{SITE}:443/accounts/login/?next=/", True),
    (f"http://{SITE}/accounts/login/?next=/", False),  # not to HTTPS
    ("https://evil.example/accounts/login/?next=/", False),
    (f"https://{SITE}.evil.example/accounts/login/?next=/", False),  # a prefix match is not enough
    (f"https://{SITE}/", False),  # the path is lost
    (None, False),  # plain HTTP answered with the page
])
def test_redirect_check_on_planted_answers(location, passes):
    ctx = context("https://127.0.0.1:8443", https_proxy=False, app=redirecting_to(location), http_url="http://127.0.0.1:8080")
    if passes:
        verify.check_https_redirect(ctx)
    else:
        with pytest.raises(verify.CheckFailed):
            verify.check_https_redirect(ctx)
