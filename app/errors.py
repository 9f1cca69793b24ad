"""HTTP error handlers.

A database outage is not a bug: pages answer 503 with Retry-After (what a load
balancer or a browser retry understands) instead of a 500, and the log gets one
warning line instead of a traceback per request. Django calls `handler500`
inside the `except` block of the request, so `sys.exc_info()` is the error.
"""
from __future__ import annotations

import logging
import sys

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.views import defaults

logger = logging.getLogger("app.errors")

RETRY_AFTER_SECONDS = 5

# Static on purpose: rendering base.html would touch request.user (the
# database) while the database is what is missing.
UNAVAILABLE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Temporarily unavailable</title></head>
<body><h1>Temporarily unavailable</h1>
<p>The chat cannot reach its database right now. Try again in a few seconds.</p></body></html>
"""


def server_error(request):
    exc = sys.exc_info()[1]
    if isinstance(exc, (OperationalError, InterfaceError)):
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("database unavailable, answered 503: %s %s: %s", request.method, request.path, first_line)
        response = HttpResponse(UNAVAILABLE_PAGE, status=503, content_type="text/html; charset=utf-8")
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        response["Cache-Control"] = "no-store"
        response._has_been_logged = True  # Django's own log_response would add a traceback
        return response
    return defaults.server_error(request)
