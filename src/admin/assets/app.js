// greygate dashboard: polls the admin API every few seconds; no external resources.
"use strict";

const REFRESH_MS = 3000;
const $ = (sel) => document.querySelector(sel);

function fmt(n) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en");
}

function text(el, value) {
  el.textContent = value;
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === undefined || value === null ? "" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function when(unix) {
  return new Date(unix * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

// The token lives in this tab only: the entry form's field, or session storage (never a
// cookie, which the browser would send by itself, nor localStorage, which outlives the tab).
const TOKEN_KEY = "greygate-token";

function token() {
  return $("#entry-token").value.trim() || sessionStorage.getItem(TOKEN_KEY) || "";
}

// Set while reads are refused for want of the token: polling waits for the token form.
let needToken = false;

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  const t = token();
  if (t) opts.headers["Authorization"] = "Bearer " + t;
  const r = await fetch(path, opts);
  let body = null;
  const type = r.headers.get("content-type") || "";
  if (type.includes("json")) body = await r.json();
  else body = await r.text();
  if (!r.ok) {
    const msg = body && body.error ? body.error : r.status + " " + r.statusText;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return body;
}

// Reads need the token (admin.token_for_reads): show the token form, stop polling.
function askToken(why) {
  needToken = true;
  sessionStorage.removeItem(TOKEN_KEY);
  $("#token-panel").hidden = false;
  text($("#token-message"), why);
  const status = $("#status");
  text(status, "admin token needed");
  status.className = "status bad";
  $("#token-input").focus();
}

function useToken(ev) {
  ev.preventDefault();
  const t = $("#token-input").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("#token-input").value = "";
  // A token typed for changes would be sent instead of this one.
  $("#entry-token").value = "";
  needToken = false;
  $("#token-panel").hidden = true;
  text($("#status"), "connecting…");
  refresh();
}

function showStats(s) {
  text($("#count-pass"), fmt(s.pass));
  text($("#count-defer"), fmt(s.defer));
  text($("#count-skip"), fmt(s.skip));
  text($("#count-failopen"), fmt(s.fail_open));
  if (s.entries) {
    text($("#count-entries"), fmt(s.entries.triplets_pending) + " / " + fmt(s.entries.triplets_passed));
    text($("#count-clients"), fmt(s.entries.clients));
  }
  const p99 = s.decision_p99_seconds;
  text($("#latency-p99"), p99 === null || p99 === undefined ? "–" : "≤ " + (p99 * 1000).toLocaleString("en") + " ms");
  text($("#count-conns"), fmt(s.listeners.reduce((a, l) => a + l.open, 0)));
  const status = $("#status");
  const mode = s.mode === "learn" ? "learn mode (nothing is deferred)" : "enforcing";
  const store = s.store_available ? s.store : "STORE UNAVAILABLE: " + s.store;
  text(status, mode + " · " + store + " · up " + Math.floor(s.uptime_seconds / 60) + " min");
  status.className = "status " + (s.store_available ? "ok" : "bad");
  text($("#version"), s.version);
}

function showChart(series) {
  const buckets = series.buckets;
  const w = 900, h = 160, pad = 24;
  const max = Math.max(1, ...buckets.map((b) => Math.max(b.pass, b.defer)));
  const bw = (w - pad) / Math.max(1, buckets.length);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + w + " " + (h + 16));
  svg.setAttribute("preserveAspectRatio", "none");
  const line = (key, cls) => {
    const pts = buckets.map((b, i) => (pad + i * bw + bw / 2).toFixed(1) + "," + (h - (b[key] / max) * (h - 8)).toFixed(1));
    const p = document.createElementNS(ns, "polyline");
    p.setAttribute("points", pts.join(" "));
    p.setAttribute("class", cls);
    svg.appendChild(p);
  };
  const axis = document.createElementNS(ns, "text");
  axis.setAttribute("x", "0");
  axis.setAttribute("y", "12");
  axis.setAttribute("class", "axis");
  axis.textContent = String(max);
  svg.appendChild(axis);
  const base = document.createElementNS(ns, "line");
  base.setAttribute("x1", String(pad));
  base.setAttribute("x2", String(w));
  base.setAttribute("y1", String(h));
  base.setAttribute("y2", String(h));
  base.setAttribute("class", "base");
  svg.appendChild(base);
  line("pass", "pass");
  line("defer", "defer");
  if (buckets.length) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", String(pad));
    t.setAttribute("y", String(h + 14));
    t.setAttribute("class", "axis");
    t.textContent = when(buckets[0].start);
    svg.appendChild(t);
    const e = document.createElementNS(ns, "text");
    e.setAttribute("x", String(w - 60));
    e.setAttribute("y", String(h + 14));
    e.setAttribute("class", "axis");
    e.textContent = when(buckets[buckets.length - 1].start);
    svg.appendChild(e);
  }
  $("#chart").replaceChildren(svg);
}

function fillTable(sel, rows, render) {
  const body = $(sel + " tbody");
  const out = rows.map((r) => {
    const tr = document.createElement("tr");
    render(tr, r);
    return tr;
  });
  if (!out.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "nothing yet", "empty");
    td.colSpan = $(sel + " thead tr").children.length;
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function showTop(top) {
  const row = (tr, t) => {
    cell(tr, t.name);
    cell(tr, fmt(t.defers), "num");
  };
  fillTable("#top-groups", top.client_groups, row);
  fillTable("#top-domains", top.sender_domains, row);
}

function showRecent(list) {
  fillTable("#recent", list, (tr, d) => {
    cell(tr, when(d.at));
    const v = cell(tr, d.enforced ? d.verdict : d.verdict + " (learn)", "verdict " + d.verdict);
    v.title = d.detail || "";
    cell(tr, d.rule);
    cell(tr, d.client);
    cell(tr, d.group);
    cell(tr, d.sender || "<>");
    cell(tr, d.recipient);
    cell(tr, d.domain || "");
    const td = document.createElement("td");
    // A deferral that left a pending triplet: releasing it accepts the next retry at once.
    if (d.verdict === "defer" && (d.rule === "new" || d.rule === "early-retry")) {
      const b = document.createElement("button");
      b.textContent = "release";
      b.className = "small release";
      b.title = "accept the sender's next retry at once (needs the admin token)";
      b.addEventListener("click", () => release(d));
      td.appendChild(b);
    }
    tr.appendChild(td);
  });
}

async function release(d) {
  const m = $("#release-message");
  try {
    const r = await api("/api/release", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ client: d.group, sender: d.sender, recipient: d.recipient }),
    });
    if (token()) sessionStorage.setItem(TOKEN_KEY, token());
    if (r.count > 0) {
      const keys = r.released.map((k) => k.client + " / " + k.sender + " / " + k.recipient);
      text(m, "released " + keys.join(", ") + ": the next retry is accepted at once");
    } else if (r.already_passed.length) {
      text(m, "already passed, nothing to release");
    } else {
      text(m, "nothing to release: no pending triplet (expired or removed)");
    }
    m.className = "message " + (r.count > 0 ? "ok" : "bad");
  } catch (err) {
    text(m, err.message);
    m.className = "message bad";
  }
}

function showEntries(res) {
  fillTable("#entries", res.entries, (tr, e) => {
    cell(tr, e.id);
    cell(tr, e.list, "verdict " + (e.list === "allow" ? "pass" : "defer"));
    cell(tr, e.target);
    cell(tr, e.value);
    cell(tr, e.expires_at ? new Date(e.expires_at * 1000).toLocaleString("en-GB") : "never");
    cell(tr, e.comment || "");
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.textContent = "remove";
    b.className = "small";
    b.addEventListener("click", () => removeEntry(e));
    td.appendChild(b);
    tr.appendChild(td);
  });
}

async function refresh() {
  if (needToken) return;
  try {
    const [stats, series, top, recent, entries] = await Promise.all([
      api("/api/stats"),
      api("/api/series?seconds=3600"),
      api("/api/top?limit=10"),
      api("/api/recent?limit=25"),
      api("/api/runtime"),
    ]);
    showStats(stats);
    showChart(series);
    showTop(top);
    showRecent(recent);
    showEntries(entries);
  } catch (err) {
    if (err.status === 401) {
      askToken(err.message);
      return;
    }
    const status = $("#status");
    text(status, "cannot reach the daemon: " + err.message);
    status.className = "status bad";
  }
}

async function explain(ev) {
  ev.preventDefault();
  const q = new URLSearchParams({
    client: $("#explain-client").value.trim(),
    name: $("#explain-name").value.trim(),
    from: $("#explain-from").value.trim(),
    to: $("#explain-to").value.trim(),
  });
  const out = $("#explain-result");
  out.className = "result";
  try {
    const x = await api("/api/explain?" + q.toString());
    text(out, x.text);
    out.className = "result " + x.decision.verdict;
  } catch (err) {
    text(out, err.message);
    out.className = "result error";
  }
}

function message(msg, ok) {
  const m = $("#entry-message");
  text(m, msg);
  m.className = "message " + (ok ? "ok" : "bad");
}

async function addEntry(ev) {
  ev.preventDefault();
  const body = {
    target: $("#entry-target").value,
    value: $("#entry-value").value.trim(),
    comment: $("#entry-comment").value.trim(),
  };
  const ttl = $("#entry-ttl").value.trim();
  if (ttl) body.ttl = ttl;
  try {
    const e = await api("/api/runtime/" + $("#entry-list").value, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (token()) sessionStorage.setItem(TOKEN_KEY, token());
    message("added #" + e.id + ": " + e.list + " " + e.target + " " + e.value, true);
    $("#entry-value").value = "";
    refresh();
  } catch (err) {
    message(err.message, false);
  }
}

async function removeEntry(e) {
  try {
    await api("/api/runtime/" + e.list + "/" + e.id, { method: "DELETE" });
    message("removed #" + e.id, true);
    refresh();
  } catch (err) {
    message(err.message, false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#explain-form").addEventListener("submit", explain);
  $("#entry-form").addEventListener("submit", addEntry);
  $("#token-form").addEventListener("submit", useToken);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
