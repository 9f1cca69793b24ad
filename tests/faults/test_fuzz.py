"""A Hypothesis websocket fuzzer against the production stack.

Over 10,000 frames (invalid JSON, wrong types, huge, binary, deep nesting,
odd Unicode, HTML/script payloads) go to sockets in their own rooms. For every
frame the server must answer exactly what an oracle of the protocol predicts
(one error frame with the right code, or the message fanned out with its text
HTML-escaped), the socket stays open, and the log stays free of tracebacks,
500s and 1011 closes. Frames the protocol itself refuses (over 64 KiB,
invalid UTF-8) close with 1009 / 1007 and a new socket works.
"""
from __future__ import annotations

import html
import json
import os
import re
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.faults import results
from tests.faults.conftest import log_problems
from tests.harness import chat_client as cc

pytestmark = pytest.mark.integration

LIMIT = 2000  # CHAT_MAX_MESSAGE_LENGTH (default)
FRAME_OVERHEAD = 4096
SOCKETS = 4
BATCH = 64
EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "160"))  # 160 x >=64 frames >= 10,240
BODY = re.compile(r'<p class="body">(.*?)</p>', re.S)
ERROR = re.compile(r'data-error="([a-z_]+)"')

XSS = [
    "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "<svg/onload=alert(1)>",
    "javascript:alert(1)", "<a href=\"javascript:alert(1)\">x</a>", "{{7*7}} {% debug %}", "&lt;b&gt;",
    "<div hx-get=\"/admin/\" hx-trigger=\"load\">", "</p></article><script>x</script>", "<!--", "]]>", "\u202e<b>",
]
ODD = st.characters(codec="utf-8", exclude_categories=("Cs",))
odd_text = st.one_of(
    st.text(ODD, max_size=50),
    st.text(st.sampled_from("\u200b\u200d\u202e\u2066\ufeff\u0301\u0000\u000b\u0085\u2028\U0001f600\U0010ffff é"), max_size=30),
    st.sampled_from(XSS),
    st.builds(lambda a, b: a + b, st.sampled_from(XSS), st.text(ODD, max_size=10)),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(ODD, max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _deep(n, kind):
    n = min(n, 30000 if kind == "list" else 10000)  # stay under the 64 KiB frame limit
    return ("[" * n + "]" * n) if kind == "list" else ('{"a":' * n + "1" + "}" * n)


frames = st.one_of(
    # valid-looking messages, odd text, HTML payloads, htmx's HEADERS object
    st.builds(lambda t: json.dumps({"message": t}), odd_text),
    st.builds(lambda t: json.dumps({"message": t, "HEADERS": {"HX-Request": "true", "HX-Trigger": "send-form"}}), odd_text),
    st.builds(lambda t: json.dumps({"message": t}, ensure_ascii=False), odd_text),
    # wrong types and shapes
    st.builds(lambda v: json.dumps({"message": v}), json_values.filter(lambda v: not isinstance(v, str))),
    st.builds(json.dumps, json_values),
    # not JSON at all
    st.text(ODD, max_size=200),
    st.sampled_from(["", "{", "null", "[]", '{"message":}', "{'message': 'x'}", '{"message": "\\ud800"}',
                     '{"message": "a\\u0000b"}', '{"message": "   "}', '{"message": "x", "message": 5}', "NaN"]),
    # deep nesting (still under the 64 KiB frame limit)
    st.builds(_deep, st.integers(10, 8000), st.sampled_from(["list", "dict"])),
    st.builds(_deep, st.integers(8000, 30000), st.sampled_from(["list", "dict"])),
    # huge: over the message limit, over the frame pre-check
    st.builds(lambda n, c: json.dumps({"message": c * n}), st.integers(LIMIT - 2, LIMIT + 50), st.sampled_from("xé<\U0001f600")),
    st.builds(lambda n: json.dumps({"message": "y" * n}), st.integers(LIMIT + 1, 16000)),
    st.builds(lambda n: "z" * n, st.integers(LIMIT * 6 + FRAME_OVERHEAD + 1, 60000)),
    # binary frames
    st.binary(max_size=2000),
)


def oracle(frame) -> tuple[str, str | None]:
    """("message", stored text) or ("error", code), as the protocol promises."""
    if isinstance(frame, bytes):
        return "error", "binary"
    if len(frame) > LIMIT * 6 + FRAME_OVERHEAD:
        return "error", "too_long"
    depth = len(frame) - len(frame.lstrip('[{"a:'))
    if 300 < depth < 8000:
        # Where Python's JSON parser gives up (RecursionError -> bad_json)
        # depends on how deep the caller's stack already is: either refusal is right.
        return "error", "deep"
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return "error", "bad_json"
    if not isinstance(data, dict):
        return "error", "bad_json"
    body = data.get("message")
    if not isinstance(body, str):
        return "error", "missing_message"
    body = body.strip()
    if not body:
        return "error", "empty"
    if len(body) > LIMIT:
        return "error", "too_long"
    if "\x00" in body:
        return "error", "bad_text"
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        return "error", "bad_text"
    return "message", body


@pytest.fixture(scope="module")
def fuzz_stack(spawn):
    # The oracle predicts the answer to each frame, not the rate limits (their
    # own tests: test_flood.py, test_user_limits.py): per socket and per user lifted.
    return spawn(CHAT_RATE_PER_SECOND="100000", CHAT_RATE_BURST="100000",
                 CHAT_USER_RATE_PER_SECOND="100000", CHAT_USER_RATE_BURST="100000")


def test_fuzzed_frames_get_exact_answers_and_no_server_errors(fuzz_stack, users, make_room):
    ep = cc.endpoint(f"http://127.0.0.1:{fuzz_stack.port}")
    user = users[1]
    rooms = [make_room() for _ in range(SOCKETS)]
    sockets = [ep.websocket(f"/ws/rooms/{r}/?after=0", user.cookies) for r in rooms]
    stats = {"frames": 0, "examples": 0, "messages": 0, "errors": Counter(), "bytes": 0}
    turn = iter(range(10**9))
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=BATCH, max_size=BATCH + 16))
    def batch(batch_frames):
        ws = sockets[next(turn) % SOCKETS]
        expected_errors, expected_bodies = Counter(), Counter()
        for f in batch_frames:
            kind, value = oracle(f)
            (expected_errors if kind == "error" else expected_bodies)[value] += 1
        for f in batch_frames:
            ws.send(f)
            stats["bytes"] += len(f)
        got_errors, got_bodies = Counter(), Counter()
        for _ in batch_frames:
            frame = ws.recv(timeout=30)
            m = ERROR.search(frame)
            if m:
                got_errors[m.group(1)] += 1
                continue
            body = BODY.search(frame)
            assert body and "data-msg-id" in frame, f"unexpected frame {frame[:200]!r}"
            shown = body.group(1)
            assert "<" not in shown and ">" not in shown, f"unescaped text on display: {shown[:200]!r}"
            got_bodies[html.unescape(shown)] += 1
        deep = expected_errors.pop("deep", 0)
        either = ("bad_json", "missing_message")
        assert sum(got_errors[c] for c in either) == sum(expected_errors[c] for c in either) + deep, (got_errors, expected_errors, deep)
        assert {k: v for k, v in got_errors.items() if k not in either} == \
            {k: v for k, v in expected_errors.items() if k not in either and v}, (got_errors, expected_errors)
        expected_errors["bad_json"] += deep
        assert got_bodies == expected_bodies, (set(got_bodies) ^ set(expected_bodies))
        stats["frames"] += len(batch_frames)
        stats["examples"] += 1
        stats["messages"] += sum(expected_bodies.values())
        stats["errors"].update(expected_errors)

    try:
        batch()
        # still usable after thousands of refused frames
        for ws in sockets:
            cc.send(ws, "still here")
            cc.wait_for_text(ws, "still here")
        open_codes = [ws.close_code for ws in sockets]
    finally:
        for ws in sockets:
            ws.close()
    seconds = time.monotonic() - started
    page = user.request("GET", f"/rooms/{rooms[0]}/").text
    log = fuzz_stack.log()
    results.record(
        "fuzz",
        scenario=f"Websocket fuzzer (Hypothesis, {SOCKETS} sockets)",
        checked="every frame answered as the protocol oracle predicts (error code or escaped message); "
                "no 500, no 1011, no traceback; sockets usable afterwards",
        figure=f"{stats['frames']} frames ({stats['bytes'] / 1e6:.1f} MB) in {seconds:.0f} s: "
               f"{stats['messages']} stored and shown escaped, {sum(stats['errors'].values())} refused "
               f"({', '.join(f'{k} {v}' for k, v in stats['errors'].most_common())}); 0 server errors",
        frames=stats["frames"], examples=stats["examples"], messages=stats["messages"], errors=dict(stats["errors"]),
        megabytes=round(stats["bytes"] / 1e6, 2), seconds=round(seconds, 1),
    )
    assert stats["frames"] >= 10_000, stats
    assert open_codes == [None] * SOCKETS, open_codes
    assert "<script>alert(1)</script>" not in page
    assert not log_problems(log), "\n".join(log_problems(log)[:20])
    assert "1011" not in log


def test_protocol_level_refusals_close_cleanly_and_a_new_socket_works(fuzz_stack, users, make_room):
    ep = cc.endpoint(f"http://127.0.0.1:{fuzz_stack.port}")
    user = users[1]
    room = make_room()
    codes = {}
    for name, payload, text in (("over 64 KiB", "x" * (64 * 1024 + 1), True),
                                ("binary over 64 KiB", b"\x00" * (64 * 1024 + 1), False),
                                ("invalid UTF-8", b'{"message": "\xff\xfe"}', True)):
        ws = ep.websocket(f"/ws/rooms/{room}/?after=0", user.cookies)
        try:
            if isinstance(payload, bytes) and text:
                ws.send(payload, text=True)
            else:
                ws.send(payload)
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            codes[name] = ws.close_code
        finally:
            ws.close()
        with ep.websocket(f"/ws/rooms/{room}/?after=0", user.cookies) as fresh:
            cc.send(fresh, f"after {name}")
            cc.wait_for_text(fresh, f"after {name}")
    results.record(
        "fuzz_protocol",
        scenario="Frames the websocket protocol refuses",
        checked="over 64 KiB -> 1009, invalid UTF-8 -> 1007 (never 1011); a new socket works right after",
        figure=", ".join(f"{k}: {v}" for k, v in codes.items()),
        codes=codes,
    )
    assert codes == {"over 64 KiB": 1009, "binary over 64 KiB": 1009, "invalid UTF-8": 1007}, codes
    assert not log_problems(fuzz_stack.log())
