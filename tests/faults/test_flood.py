"""One client floods its room: it is throttled with a clear error frame, and
the others in the room keep their normal latency (default rate limit:
CHAT_RATE_PER_SECOND=5, CHAT_RATE_BURST=10)."""
from __future__ import annotations

import itertools
import json
import re
import threading
import time

import pytest

from tests.faults import accounts, results
from tests.faults.conftest import log_problems, tag
from tests.faults.swarm import Swarm, summary_ms
from tests.harness import chat_client as cc

pytestmark = pytest.mark.integration

TALKERS = 10
LISTENERS = 30
PHASE = 4.0  # seconds per phase
TALK_EVERY = 0.5  # each talker: 2 messages a second, under the limit
FLOOD_FRAMES = 4000
ERROR = re.compile(r'data-error="([a-z_]+)"')


def talk(swarm: Swarm, talkers, label: str, seconds: float):
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in talkers:
            swarm.send_from(t, f"{label} {t.index} #{n}")
        n += 1
        time.sleep(TALK_EVERY)


def latencies(swarm: Swarm, listeners, label: str) -> list[float]:
    """Send-to-shown delay of every `label` message, at every listener."""
    sent = {text: at for _, text, at in swarm.sent if text.startswith(label + " ")}
    out = []
    for c in listeners:
        for mid, frame in c.texts.items():
            body = re.search(r'<p class="body">(.*?)</p>', frame).group(1)
            if body in sent:
                out.append(c.first_seen[mid] - sent[body])
    return out


def test_flood_is_throttled_and_others_keep_normal_latency(stack, make_room):
    room = make_room()
    # Each talker its own account (2 messages a second, under the per-user
    # budget of 5), listeners 3 per account (under CHAT_MAX_SOCKETS_PER_USER):
    # only the flooder may be throttled.
    *people, flooding_account = accounts.seed(stack.env, TALKERS + 1)
    listeners_of = itertools.cycle(people)
    swarm = Swarm(stack.port, {room: [p.cookie() for p in people] + [next(listeners_of).cookie() for _ in range(LISTENERS)]})
    swarm.start()
    talkers, listeners = swarm.clients[:TALKERS], swarm.clients[TALKERS:]
    ep = cc.endpoint(stack.url)
    run = tag()
    flood = {"sent": 0, "errors": {}, "stored": 0, "seconds": 0.0}
    try:
        time.sleep(0.5)
        talk(swarm, talkers, f"base-{run}", PHASE)
        time.sleep(1.0)

        def flooder():
            with ep.websocket(f"/ws/rooms/{room}/?after=999999999999", {"sessionid": flooding_account.sessions[0]}) as ws:
                started = time.monotonic()
                reader_done = threading.Event()

                def read():
                    deadline = time.monotonic() + PHASE + 20
                    while time.monotonic() < deadline and sum(flood["errors"].values()) + flood["stored"] < FLOOD_FRAMES:
                        try:
                            frame = ws.recv(timeout=2)
                        except TimeoutError:
                            if flood["sent"] >= FLOOD_FRAMES:
                                break
                            continue
                        m = ERROR.search(frame)
                        if m:
                            flood["errors"][m.group(1)] = flood["errors"].get(m.group(1), 0) + 1
                        elif f"flood-{run}" in frame:
                            flood["stored"] += 1
                    reader_done.set()

                reader = threading.Thread(target=read, daemon=True)
                reader.start()
                for n in range(FLOOD_FRAMES):
                    ws.send(json.dumps({"message": f"flood-{run} {n}"}))
                    flood["sent"] += 1
                    time.sleep(PHASE / FLOOD_FRAMES / 2)
                flood["seconds"] = time.monotonic() - started
                reader_done.wait(PHASE + 25)

        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        time.sleep(0.3)
        talk(swarm, talkers, f"flood-phase-{run}", PHASE)
        thread.join(PHASE + 40)
        time.sleep(1.0)
        base = summary_ms(latencies(swarm, listeners, f"base-{run}"))
        during = summary_ms(latencies(swarm, listeners, f"flood-phase-{run}"))
        talker_errors = sum(len(t.errors) for t in talkers)
    finally:
        swarm.stop()
    allowed = 10 + 5 * (flood["seconds"] + 1) + 2
    results.record(
        "flood",
        scenario=f"Flood from one client ({FLOOD_FRAMES} frames in {flood['seconds']:.1f} s) in a room of {len(swarm.clients) + 1}",
        checked="flooder gets data-error=rate_limited and at most burst + rate x time stored; the others' send-to-shown latency stays normal",
        figure=f"flooder: {flood['stored']} stored, {flood['errors'].get('rate_limited', 0)} rate_limited; "
               f"others p50/p99 {base['p50_ms']}/{base['p99_ms']} ms without, {during['p50_ms']}/{during['p99_ms']} ms with the flood",
        flood=flood, baseline=base, during_flood=during, talker_errors=talker_errors,
    )
    assert flood["errors"].get("rate_limited", 0) >= FLOOD_FRAMES * 0.9, flood
    assert flood["stored"] <= allowed, flood
    assert talker_errors == 0, "a normal client was throttled"
    assert base["n"] > 0 and during["n"] >= base["n"] * 0.9, (base, during)
    assert during["p99_ms"] <= max(1000.0, 4 * base["p99_ms"]), (base, during)
    assert not log_problems(stack.gunicorn.log())
