"""app/chat/rendering.py: a message's HTML is exactly what Django's format_html gives."""
import pytest
from django.utils.html import format_html
from django.utils.safestring import SafeData, mark_safe

from app.chat import rendering

TEMPLATE = ('<article class="msg" id="msg-{}" data-msg-id="{}" data-seq="{}">'
            '<header><b class="author">{}</b> <time datetime="{}">{}</time></header>'
            '<p class="body">{}</p></article>')

HOSTILE = ['<script>alert(1)</script>', '" onmouseover="x', "' onfocus='x", "a & b &amp; c", "</p></article><div>",
           "plain", "", "é ü \u2028 \x00", "{} {0} %s"]


@pytest.mark.parametrize("body", HOSTILE)
@pytest.mark.parametrize("author", ["alice", '<img src=x onerror="y">'])
def test_article_is_what_format_html_renders(author, body):
    iso = "2026-12-08T00:30:01.123456+00:00"
    expected = format_html(TEMPLATE, 12, 12, 7, author, iso, iso[11:16], body)
    got = rendering.article_html(12, 7, author, body, iso)
    assert got == expected
    assert isinstance(got, SafeData)


def test_the_frame_wraps_an_article_and_refuses_a_plain_string():
    article = rendering.article_html(1, 1, "a", "<b>", "2026-12-08T00:30:01+00:00")
    frame = rendering.message_frame(article)
    assert frame == mark_safe('<div hx-swap-oob="beforeend:#messages">') + article + mark_safe("</div>")
    assert isinstance(frame, SafeData)
    with pytest.raises(TypeError):
        rendering.message_frame("<b>not escaped</b>")
