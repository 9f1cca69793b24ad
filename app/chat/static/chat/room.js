// Room page glue for htmx-ext-ws: reconnect with ?after=<cursor> so the server
// replays what was missed, drop frames for messages already shown, and keep
// the form and the connection status tidy.
//
// The cursor is the highest seq (data-seq: the message's number in its room)
// below which this page shows every message, not the newest seq it shows:
// two workers can publish 100 before 99, and a page that reconnected with
// after=100 would never get 99. Seqs above the cursor that arrived early wait
// in `early` until the gap below them closes; a replay resends them and they
// are dropped here because they are already shown.
(function () {
  "use strict";
  var box = document.getElementById("messages");
  if (!box) return;
  var cursor = parseInt(box.dataset.lastSeq || "0", 10);
  var early = {};
  var status = document.getElementById("ws-status");

  function closeUp() {
    while (early[cursor + 1]) {
      delete early[cursor + 1];
      cursor += 1;
    }
  }

  // htmx-ext-ws calls htmx.createWebSocket for the first connection and for
  // every reconnect, so the URL always carries the current cursor.
  htmx.createWebSocket = function (url) {
    var u = new URL(url);
    u.searchParams.set("after", String(cursor));
    return new WebSocket(u.toString());
  };

  document.body.addEventListener("htmx:wsBeforeMessage", function (evt) {
    var text = evt.detail.message;
    var skip = /data-upto="(\d+)"/.exec(text);
    if (skip) {
      // The server skipped older messages on purpose (more were missed than
      // a replay sends): stop waiting for them.
      evt.preventDefault();
      var upto = parseInt(skip[1], 10);
      if (upto > cursor) {
        for (var k in early) if (+k <= upto) delete early[k];
        cursor = upto;
        closeUp();
      }
      return;
    }
    var m = /data-msg-id="(\d+)"[^>]*data-seq="(\d+)"/.exec(text);
    if (!m) return;
    var seq = parseInt(m[2], 10);
    if (document.getElementById("msg-" + m[1]) || seq <= cursor) {
      evt.preventDefault(); // already shown: a replay overlapping the live stream
      return;
    }
    early[seq] = true;
    closeUp();
  });
  document.body.addEventListener("htmx:wsAfterMessage", function () {
    // A message that arrived early was appended; one that filled a gap below
    // it moves up to its place, so the page reads in room order.
    var last = box.lastElementChild;
    var before = last && last.previousElementSibling;
    while (before && +before.dataset.seq > +last.dataset.seq) before = before.previousElementSibling;
    if (last && before !== last.previousElementSibling) box.insertBefore(last, before ? before.nextSibling : box.firstChild);
    box.scrollTop = box.scrollHeight;
  });
  document.body.addEventListener("htmx:wsAfterSend", function (evt) {
    var form = document.getElementById("send-form");
    if (form) form.reset();
    var err = document.getElementById("chat-error");
    if (err) err.textContent = "";
  });
  document.body.addEventListener("htmx:wsOpen", function () {
    status.textContent = "connected";
    status.dataset.state = "open";
  });
  // Close codes after which the server will not take this socket back:
  // htmx-ext-ws reconnects only after 1006, 1011, 1012 and 1013, so the page
  // says why it stopped (the error frame before the close has the details)
  // instead of looking like it is still trying.
  var ENDED = {
    4401: { state: "signed out", link: "chat-sign-in" }, // logout, password changed, user or session deleted
    4403: { state: "account disabled" },
    4404: { state: "room deleted", link: "chat-rooms" },
    1008: { state: "refused" } // e.g. too many connections for this account
  };
  var ended = false;
  document.body.addEventListener("htmx:wsClose", function (evt) {
    var code = evt.detail && evt.detail.event ? evt.detail.event.code : 0;
    var end = ENDED[code];
    if (!end) {
      if (ended) return;
      status.textContent = "reconnecting…";
      status.dataset.state = "closed";
      return;
    }
    ended = true;
    status.textContent = end.state;
    status.dataset.state = "ended";
    var form = document.getElementById("send-form");
    if (form) {
      var fields = form.querySelectorAll("input, button");
      for (var i = 0; i < fields.length; i++) fields[i].disabled = true;
    }
    var panel = document.getElementById("chat-ended");
    if (panel) {
      var err = document.getElementById("chat-error");
      panel.querySelector(".why").textContent = (err && err.textContent) || end.state;
      if (end.link) document.getElementById(end.link).hidden = false;
      panel.dataset.code = String(code);
      panel.hidden = false;
    }
  });
  box.scrollTop = box.scrollHeight;
})();
