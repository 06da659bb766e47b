// The ODLA dashboard: polls the operator's own API every two seconds and redraws.
// Everything shown is set as text (node names, models and errors come from the network).
"use strict";

const EVERY_MS = 2000;
const KEY = "odla-api-key";
let timer = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function api(path) {
  const key = localStorage.getItem(KEY);
  const resp = await fetch(path, { headers: key ? { Authorization: "Bearer " + key } : {}, cache: "no-store" });
  if (resp.status === 401) throw Object.assign(new Error("an API key is needed"), { auth: true });
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 60 ? s.toFixed(0) + " s ago" : s < 3600 ? (s / 60).toFixed(0) + " min ago" : (s / 3600).toFixed(1) + " h ago";
}

function seconds(from, to) {
  if (!from || !to) return "";
  const s = (Date.parse(to) - Date.parse(from)) / 1000;
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}

function fill(tbody, rows, columns, empty) {
  tbody.replaceChildren();
  if (!rows.length) {
    const td = el("td", empty, "empty");
    td.colSpan = columns;
    const tr = el("tr");  // (append returns nothing: it cannot be chained)
    tr.append(td);
    tbody.append(tr);
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    tbody.append(tr);
  }
}

function drawNodes(nodes) {
  const up = nodes.filter((n) => n.healthy && !n.resting_until).length;
  document.getElementById("t-nodes").textContent = up + " / " + nodes.length;
  document.getElementById("t-inflight").textContent = nodes.reduce((sum, n) => sum + n.active_jobs, 0);
  const rows = nodes.map((n) => {
    const health = n.resting_until ? ["resting", "warn"] : n.healthy ? ["healthy", "ok"] : ["unhealthy", "bad"];
    const slots = Object.entries(n.slots || {}).map(([m, s]) => m + " ×" + s).join(", ");
    const builds = (n.other_builds || []).length ? " · another build elsewhere: " + n.other_builds.join(", ") : "";
    const key = el("td", n.address ? n.address.slice(0, 6) + "…" + n.address.slice(-4) : "unsigned", "mono");
    if (n.address) key.title = n.address;
    return [el("td", n.node_id, "mono"), key, el("td", health[0], health[1]), el("td", n.active_jobs, "num"),
            el("td", (slots || "1 each") + builds, builds ? "wrap warn" : "wrap"),
            el("td", (n.loaded || []).join(", ") || "none", "wrap"),
            el("td", n.tokens_per_s == null ? "" : n.tokens_per_s.toFixed(1), "num"), el("td", n.jobs_total, "num"),
            el("td", n.reputation.toFixed(2) + (n.quarantined ? " quarantined" : ""), n.quarantined ? "bad" : "num"),
            ago(n.last_seen)];
  });
  fill(document.querySelector("#nodes tbody"), rows, 10, "No node has joined yet: start one with python node.py");
}

function drawJobs(jobs) {
  const rows = jobs.map((j) => {
    const cls = j.outcome === "ok" ? "ok" : j.outcome === "client_cancel" ? "warn" : "bad";
    return [new Date(j.started_at).toLocaleTimeString(), el("td", j.id.slice(0, 12), "mono"), j.model,
            el("td", j.node || "–", "mono"), j.door, el("td", j.outcome, cls),
            el("td", j.prompt_tokens ?? "", "num"), el("td", j.output_tokens ?? "", "num"),
            el("td", seconds(j.started_at, j.first_token_at), "num"), el("td", seconds(j.started_at, j.finished_at), "num"),
            el("td", j.error || "", "wrap")];
  });
  fill(document.querySelector("#jobs tbody"), rows, 11, "No job yet.");
}

function drawActivity(a) {
  const perSecond = (values) => values.map((v) => v / a.step_s);
  const requests = perSecond(a.requests), tokens = perSecond(a.output_tokens);
  const line = (values, id) => {
    const top = Math.max(...values, 1e-9), n = values.length;
    const points = values.map((v, i) => (i * 600 / (n - 1)).toFixed(1) + "," + (135 - v / top * 125).toFixed(1));
    document.getElementById(id).setAttribute("points", points.join(" "));
  };
  line(requests, "line-requests");
  line(tokens, "line-tokens");
  // the last full minute: the last bucket is still filling
  const minute = Math.round(60 / a.step_s);
  const recent = (values) => values.slice(-minute - 1, -1).reduce((s, v) => s + v, 0) / minute;
  document.getElementById("t-rps").textContent = recent(requests).toFixed(2);
  document.getElementById("t-tps").textContent = recent(tokens).toFixed(1);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [nodes, jobs, activity] = await Promise.all([api("/nodes"), api("/jobs?limit=25"), api("/dashboard/activity")]);
    drawNodes(nodes.nodes);
    drawJobs(jobs.jobs);
    drawActivity(activity);
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (err) {
    status.textContent = err.message;
    status.className = "bad";
    if (err.auth) {
      document.getElementById("login").classList.add("shown");
      clearInterval(timer);
      timer = null;
    }
  }
}

function start() {
  if (timer === null) timer = setInterval(refresh, EVERY_MS);
  refresh();
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, document.getElementById("key").value.trim());
  document.getElementById("login").classList.remove("shown");
  start();
});

start();
