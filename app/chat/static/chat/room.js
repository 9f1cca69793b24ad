// Room page glue for htmx-ext-ws: reconnect with ?after=<last id shown> so the
// server replays what was missed, drop frames for messages already shown, and
// keep the form and the connection status tidy.
(function () {
  "use strict";
  var box = document.getElementById("messages");
  if (!box) return;
  var lastId = parseInt(box.dataset.lastId || "0", 10);
  var status = document.getElementById("ws-status");

  // htmx-ext-ws calls htmx.createWebSocket for the first connection and for
  // every reconnect, so the URL always carries the newest id this page shows.
  htmx.createWebSocket = function (url) {
    var u = new URL(url);
    u.searchParams.set("after", String(lastId));
    return new WebSocket(u.toString());
  };

  document.body.addEventListener("htmx:wsBeforeMessage", function (evt) {
    var m = /data-msg-id="(\d+)"/.exec(evt.detail.message);
    if (!m) return;
    var id = parseInt(m[1], 10);
    if (document.getElementById("msg-" + id)) {
      evt.preventDefault(); // already shown: a replay overlapping the live stream
      return;
    }
    if (id > lastId) lastId = id;
  });
  document.body.addEventListener("htmx:wsAfterMessage", function () {
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
  document.body.addEventListener("htmx:wsClose", function () {
    status.textContent = "reconnecting…";
    status.dataset.state = "closed";
  });
  box.scrollTop = box.scrollHeight;
})();
