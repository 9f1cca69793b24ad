"""Login and sign-up attempts per client address, and the pages that refuse.

Every POST to the login pages (ours and the admin's) and to the sign-up page
takes a token from its client address's bucket (app/chat/throttle.py) before
Django does anything costly (each one hashes a password). Over the limit:
HTTP 429 with Retry-After and a page that says when to try again. Failed
logins per account are django-axes' (settings AXES_*); its lockout answers
with the same page (`locked_out`). If Redis cannot be reached, these pages
answer 503 with Retry-After instead of letting attempts through uncounted
or failing with a 500.
"""
from __future__ import annotations

import logging
import math

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.shortcuts import render
from django.urls import reverse

from app.chat import throttle
from app.observability import metrics

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER = 5
MESSAGES = {
    "login": "Too many login attempts from your network. Try again in {wait}.",
    "signup": "Too many sign-ups from your network. Try again in {wait}.",
    "locked": "Too many failed logins for this account. Try again in {wait}.",
    "unavailable": "Signing in is unavailable for a moment. Try again in {wait}.",
}


def _wait(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{math.ceil(seconds / 60)} minutes"


def refused(request, kind: str, status: int, retry_after: int):
    response = render(request, "registration/refused.html",
                      {"message": MESSAGES[kind].format(wait=_wait(retry_after)), "kind": kind}, status=status)
    response["Retry-After"] = str(retry_after)
    response["Cache-Control"] = "no-store"
    return response


def locked_out(request, *args, **kwargs):
    """AXES_LOCKOUT_CALLABLE (axes calls it with 2 or 3 arguments)."""
    metrics.rate_limited("account")
    return refused(request, "locked", 429, math.ceil(settings.AXES_COOLOFF_TIME.total_seconds()))


def _limited_paths() -> dict[str, tuple[str, callable]]:
    return {
        reverse("login"): ("login", throttle.logins),
        reverse("admin:login"): ("login", throttle.logins),
        reverse("signup"): ("signup", throttle.signups),
    }


class ThrottleMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        self._paths = None

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        if request.method == "POST":
            refusal = self.check(request)
            if refusal is not None:
                return refusal
        return self.get_response(request)

    async def __acall__(self, request):
        if request.method == "POST":
            refusal = await sync_to_async(self.check, thread_sensitive=True)(request)
            if refusal is not None:
                return refusal
        return await self.get_response(request)

    def check(self, request):
        if self._paths is None:
            self._paths = _limited_paths()
        found = self._paths.get(request.path_info)
        if found is None:
            return None
        kind, limit = found
        try:
            verdict = throttle.hit(limit(), throttle.address_of(throttle.request_address(request)))
        except throttle.Unavailable as exc:
            log.warning("%s %s: rate-limit store unavailable (%s), refused", request.method, request.path, exc)
            return refused(request, "unavailable", 503, UNAVAILABLE_RETRY_AFTER)
        if verdict.allowed:
            return None
        return refused(request, kind, 429, verdict.retry_after)

    def process_exception(self, request, exception):
        # django-axes reads and writes its counts in the Redis cache while the
        # login view runs: Redis down there is an outage, not a bug.
        from redis.exceptions import RedisError

        if isinstance(exception, RedisError):
            log.warning("%s %s: Redis unavailable (%s), refused", request.method, request.path, type(exception).__name__)
            return refused(request, "unavailable", 503, UNAVAILABLE_RETRY_AFTER)
        return None
