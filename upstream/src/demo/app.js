// The demo page: each button calls its endpoint through the gateway and shows the answer with
// the headers the filter sets; the feed follows GET /api/events/stream (Server-Sent Events).
// Everything from the network is shown with textContent, never parsed as HTML.
"use strict";

// The response headers each answer shows, when present.
const SHOWN_HEADERS = [
  "x-cache",
  "cache-status",
  "age",
  "ratelimit",
  "ratelimit-policy",
  "retry-after",
  "x-krowoc-invalidate",
];
// Older entries are removed past this, in each list.
const MAX_ITEMS = 200;
const BODY_PREVIEW_CHARS = 700;
const FEED_RETRY_MS = 5000;

const byId = (id) => document.getElementById(id);
let answers = 0;

// An element with attributes (data-* via "data-…" keys) and children (strings become text).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function prepend(list, item) {
  list.prepend(item);
  while (list.children.length > MAX_ITEMS) list.lastElementChild.remove();
}

function statusClass(status) {
  return "status s" + String(status).charAt(0) + "xx";
}

function preview(text) {
  let shown = text;
  try {
    shown = JSON.stringify(JSON.parse(text), null, 1);
  } catch (_) {
    // not JSON: shown as it came
  }
  return shown.length > BODY_PREVIEW_CHARS ? shown.slice(0, BODY_PREVIEW_CHARS) + " …" : shown;
}

// What a button sends: its data-method and data-path, with the inputs it takes.
function requestFor(button) {
  const user = byId("user-id").value.trim();
  let url = button.dataset.path;
  let body;
  switch (button.id) {
    case "cached-data":
      if (user) url += "?user_id=" + encodeURIComponent(user);
      break;
    case "invalidate-cache":
      body = user ? { user_id: user } : {};
      break;
    case "publish-event":
      body = {
        channel: "app:events",
        message: {
          event_type: "demo_note",
          note: byId("note").value,
          sent_at: new Date().toISOString(),
        },
      };
      break;
    case "recent-events":
      url += "?limit=5";
      break;
  }
  return { method: button.dataset.method, url, body };
}

function answerItem(n, endpoint, request, status, headers, text, tookMs) {
  const shown = el("dl", { class: "headers" });
  for (const name of SHOWN_HEADERS) {
    const value = headers.get(name);
    if (value === null) continue;
    shown.append(el("dt", {}, name), el("dd", { "data-header": name }, value));
  }
  return el(
    "li",
    {
      class: "answer",
      "data-n": n,
      "data-endpoint": endpoint,
      "data-status": status,
      "data-x-cache": headers.get("x-cache"),
    },
    el(
      "div",
      { class: "line" },
      el("span", { class: statusClass(status) }, String(status)),
      el("code", {}, request.method + " " + request.url),
      el("span", { class: "took" }, Math.round(tookMs) + " ms"),
      el("span", { class: "n" }, "#" + n),
    ),
    shown.children.length ? shown : null,
    el("pre", { class: "body" }, preview(text)),
  );
}

async function call(button) {
  const request = requestFor(button);
  const n = ++answers;
  const init = { method: request.method, cache: "no-store", headers: {} };
  if (request.body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(request.body);
  }
  const started = performance.now();
  let item;
  try {
    const response = await fetch(request.url, init);
    const text = await response.text();
    const took = performance.now() - started;
    item = answerItem(n, button.id, request, response.status, response.headers, text, took);
  } catch (error) {
    item = el(
      "li",
      { class: "answer failed", "data-n": n, "data-endpoint": button.id, "data-status": 0 },
      el("div", { class: "line" }, el("code", {}, request.method + " " + request.url)),
      el("pre", { class: "body" }, "no answer: " + error),
    );
  }
  byId("answers-empty").hidden = true;
  prepend(byId("answer-list"), item);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function tag(text, kind) {
  return el("span", { class: "tag " + (kind || "") }, text);
}

// One received message: a request event from the filter, or any other message.
function feedItem(event) {
  const m = event.message;
  const time = el("time", { datetime: event.received_at }, clock(event.received_at_unix_ms));
  if (m && typeof m === "object" && m.event_type === "http_request") {
    return el(
      "li",
      {
        class: "event request",
        "data-channel": event.channel,
        "data-seq": event.seq,
        "data-path": m.path,
        "data-status": m.status,
        "data-cache": m.cache,
        "data-rate-limit": m.rate_limit,
      },
      time,
      el("span", { class: statusClass(m.status) }, String(m.status)),
      el("code", {}, m.method + " " + m.path),
      m.cache ? tag("cache " + m.cache, "cache") : null,
      m.rate_limit ? tag("rate limit " + m.rate_limit, "limit") : null,
      tag(m.duration_ms + " ms"),
    );
  }
  return el(
    "li",
    { class: "event app", "data-channel": event.channel, "data-seq": event.seq },
    time,
    tag(event.channel, "channel"),
    el("code", {}, typeof m === "string" ? m : JSON.stringify(m)),
  );
}

function setFeedStatus(state, text) {
  const status = byId("feed-status");
  status.dataset.state = state;
  status.textContent = text;
}

// The subscriber's state, as the stream reports it.
function showSubscriber(s) {
  switch (s.state) {
    case "subscribed":
      setFeedStatus("subscribed", "live: subscribed to " + s.channels.join(", "));
      break;
    case "reconnecting": {
      const retry = s.retry_in_ms === null ? "" : " in " + s.retry_in_ms + " ms";
      setFeedStatus("reconnecting", "Redis unreachable; the subscriber retries" + retry + ": " + s.last_error);
      break;
    }
    case "disabled":
      setFeedStatus("disabled", "the upstream runs no subscriber (--no-subscriber)");
      break;
    default:
      setFeedStatus(s.state, "the subscriber is " + s.state + "…");
  }
}

function followFeed() {
  const list = byId("feed-list");
  const source = new EventSource("/api/events/stream");
  source.addEventListener("status", (e) => showSubscriber(JSON.parse(e.data)));
  source.addEventListener("lagged", (e) => {
    const skipped = JSON.parse(e.data).skipped;
    prepend(list, el("li", { class: "event lagged" }, "skipped " + skipped + " events: this page fell behind"));
  });
  source.onmessage = (e) => prepend(list, feedItem(JSON.parse(e.data)));
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (every stream slot taken) or not an event stream: the browser gives up.
      source.close();
      setFeedStatus("refused", "the stream was refused; trying again in " + FEED_RETRY_MS / 1000 + " s");
      setTimeout(followFeed, FEED_RETRY_MS);
    } else {
      setFeedStatus("interrupted", "the stream was interrupted; reconnecting…");
    }
  };
}

for (const button of document.querySelectorAll("#endpoints button")) {
  button.addEventListener("click", () => call(button));
}
followFeed();
