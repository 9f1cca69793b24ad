"""Message HTML, rendered once on the server and fanned out as-is.

Every websocket frame is an htmx out-of-band swap, so the htmx websocket
extension applies it with no client code; the data attributes let other
clients (the black-box verifier, the benchmark) read frames without an HTML
parser. The room page renders its history with the same function.
"""
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe


def article_html(message_id: int, seq: int, author: str, body: str, created_iso: str) -> SafeString:
    # format_html escapes every argument: the stored body is shown as text.
    # data-seq is the message's number in its room (models.Message): clients
    # reconnect with ?after=<highest seq below which they miss none>.
    return format_html(
        '<article class="msg" id="msg-{}" data-msg-id="{}" data-seq="{}">'
        '<header><b class="author">{}</b> <time datetime="{}">{}</time></header>'
        '<p class="body">{}</p></article>',
        message_id, message_id, seq, author, created_iso, created_iso[11:16], body,
    )


def article_html_from(message) -> SafeString:
    author = message.author.get_username() if message.author_id else "(deleted)"
    return article_html(message.id, message.seq, author, message.body, message.created_at.isoformat())


def message_frame(article: str) -> str:
    return mark_safe('<div hx-swap-oob="beforeend:#messages">') + article + mark_safe("</div>")


def cursor_frame(upto: int) -> str:
    """Tells the client that every seq up to `upto` it does not show was
    skipped on purpose (more missed than a replay sends): its cursor moves on.
    room.js consumes it; the element in room.html only catches a stray swap."""
    return format_html('<div id="chat-cursor" hx-swap-oob="true" hidden data-upto="{}"></div>', upto)


def error_frame(code: str, text: str) -> str:
    return format_html('<div id="chat-error" hx-swap-oob="true" role="alert" data-error="{}">{}</div>', code, text)
