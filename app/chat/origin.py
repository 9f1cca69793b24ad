"""The websocket Origin check: scheme, host and port, not the host alone.

Channels' AllowedHostsOriginValidator compares only the Origin's host with
ALLOWED_HOSTS, so `http://chat.example.com:6666` (another scheme, another
port: another origin, possibly another program on that host) passes. Here an
Origin is allowed when it is

* one of CSRF_TRUSTED_ORIGINS (Django's syntax: `https://chat.example.com:8443`,
  `https://*.example.com`), or
* `https://` + a host in ALLOWED_HOSTS + the port the client connected
  through, i.e. the port in the Host header the browser sent (a proxy passes
  it on), or the default port of the scheme the client used when the Host
  has none. `http://` origins count too only with DEBUG or with
  SECURE_SSL_REDIRECT off (a site that serves plain HTTP on purpose).

With `ALLOWED_HOSTS=*` (allowed only with ALLOW_ANY_HOST=True) the host must
be the one in the Host header: a wildcard does not switch the check off.

The scheme the client used is Django's own answer (SECURE_PROXY_SSL_HEADER,
as for `request.is_secure()`), falling back to the scope's scheme; a browser
script cannot set X-Forwarded-Proto on a websocket, and any other client can
send any Origin anyway: the check exists for browsers.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import is_same_domain, split_domain_port, validate_host

DEFAULT_PORT = {"http": 80, "https": 443}


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def connection_is_secure(scope) -> bool:
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:
        name, secure_value = proxy
        value = header(scope, name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1"))
        if value is not None:
            return value.split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") in ("wss", "https")


def _parse(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, or None if it is not one."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORT or not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # as in ALLOWED_HOSTS
    return parts.scheme, host, port or DEFAULT_PORT[parts.scheme]


def _trusted(origin: str, parsed: tuple[str, str, int]) -> bool:
    scheme, host, port = parsed
    netloc = urlsplit(origin).netloc.lower()
    for entry in settings.CSRF_TRUSTED_ORIGINS:
        trusted = urlsplit(entry)
        if trusted.scheme != scheme:
            continue
        if trusted.netloc.startswith("*"):
            if is_same_domain(netloc, trusted.netloc[1:]):
                return True
        elif _parse(entry) == parsed:
            return True
    return False


def insecure_origins_allowed() -> bool:
    return settings.DEBUG or not settings.SECURE_SSL_REDIRECT


def allowed(scope) -> bool:
    origin = header(scope, b"origin")
    host = header(scope, b"host")
    if origin is None or host is None:
        return False
    parsed = _parse(origin.strip())
    if parsed is None:
        return False
    if _trusted(origin.strip(), parsed):
        return True
    scheme, origin_host, origin_port = parsed
    if scheme == "http" and not insecure_origins_allowed():
        return False
    domain, port = split_domain_port(host)
    if not domain:
        return False
    if port:
        connected_port = int(port)
    else:
        connected_port = 443 if connection_is_secure(scope) else 80
    if origin_port != connected_port:
        return False
    patterns = [pattern for pattern in settings.ALLOWED_HOSTS if pattern != "*"]
    if "*" in settings.ALLOWED_HOSTS:
        patterns.append(domain)
    return validate_host(origin_host, patterns)
