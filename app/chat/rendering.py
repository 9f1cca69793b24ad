"""Message HTML, rendered once on the server and fanned out as-is.

Every websocket frame is an htmx out-of-band swap, so the htmx websocket
extension applies it with no client code; the data attributes let other
clients (the black-box verifier, the benchmark) read frames without an HTML
parser. The room page renders its history with the same function.
"""
from html import escape

from django.utils.html import format_html
from django.utils.safestring import SafeData, SafeString


def article_html(message_id: int, seq: int, author: str, body: str, created_iso: str) -> SafeString:
    # Every argument escaped: the stored body is shown as text. data-seq is the
    # message's number in its room (models.Message): clients reconnect with
    # ?after=<highest seq below which they miss none>.
    # The same HTML format_html gives (it escapes each argument with
    # html.escape, as here: tests/unit/test_rendering.py compares the two);
    # format_html's lazy-string and SafeData checks per argument were the
    # biggest part of a received frame's handling in a cProfile; unprofiled
    # the gain is within the noise (bench/README.md "The message path").
    mid, iso = escape(str(message_id)), escape(str(created_iso))
    return SafeString(
        f'<article class="msg" id="msg-{mid}" data-msg-id="{mid}" data-seq="{escape(str(seq))}">'
        f'<header><b class="author">{escape(str(author))}</b> <time datetime="{iso}">{escape(str(created_iso)[11:16])}</time></header>'
        f'<p class="body">{escape(str(body))}</p></article>'
    )


def article_html_from(message) -> SafeString:
    author = message.author.get_username() if message.author_id else "(deleted)"
    return article_html(message.id, message.seq, author, message.body, message.created_at.isoformat())


def message_frame(article: SafeString) -> SafeString:
    """An article (article_html's, escaped already) as a frame: appended to #messages."""
    if not isinstance(article, SafeData):
        raise TypeError("message_frame takes article_html's output, not a plain str")
    return SafeString('<div hx-swap-oob="beforeend:#messages">' + article + "</div>")


def cursor_frame(upto: int) -> str:
    """Tells the client that every seq up to `upto` it does not show was
    skipped on purpose (more missed than a replay sends): its cursor moves on.
    room.js consumes it; the element in room.html only catches a stray swap."""
    return format_html('<div id="chat-cursor" hx-swap-oob="true" hidden data-upto="{}"></div>', upto)


def error_frame(code: str, text: str) -> str:
    return format_html('<div id="chat-error" hx-swap-oob="true" role="alert" data-error="{}">{}</div>', code, text)
