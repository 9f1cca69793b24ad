"""Websocket URL helpers, as in the SaaS Pegasus docs.

    room_ws_url = websocket_absolute_url(websocket_reverse("ws_group_chat", args=[room_id]))

The absolute URL comes from the Sites framework's domain (kept equal to
SITE_DOMAIN by `migrate`) and USE_HTTPS_IN_ABSOLUTE_URLS.
"""
from django.conf import settings
from django.contrib.sites.models import Site
from django.urls import reverse


def websocket_reverse(name, args=None, kwargs=None) -> str:
    return reverse(name, urlconf="app.channels_urls", args=args, kwargs=kwargs)


def websocket_absolute_url(path: str) -> str:
    scheme = "wss" if settings.USE_HTTPS_IN_ABSOLUTE_URLS else "ws"
    return f"{scheme}://{Site.objects.get_current().domain}{path}"
