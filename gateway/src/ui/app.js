// Miyamoto's dashboard: plain JavaScript over the gateway's own API, no
// build step and no network beyond the gateway (see README, "Dashboard").
// Views: #/ (queues), #/queue/NAME (its tasks), #/queue/NAME/task/ID,
// #/cluster. It refreshes every 2 s while the tab is visible.
"use strict";

const REFRESH_MS = 2000;
// Dispatches per second per queue, one point per refresh, ten minutes.
const HISTORY = 300;
const history = new Map();
let timer = null;

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  }
  return e;
}

function token() {
  return sessionStorage.getItem("miyamoto-token") || "";
}

// A call to the API with the token, if one was given; a 401 asks for one.
async function api(method, path) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, { method, headers });
  if (r.status === 401) {
    $("#token-box").hidden = false;
    throw new Error("an API token is needed");
  }
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.reason) || r.status + " " + r.statusText);
  return body;
}

function status(text) {
  $("#status").textContent = text;
}

function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "";
}

function sparkline(points) {
  const w = 120, h = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const max = Math.max(1, ...points);
  const step = points.length > 1 ? w / (points.length - 1) : w;
  const d = points.map((p, i) => `${(i * step).toFixed(1)},${(h - 2 - (p / max) * (h - 4)).toFixed(1)}`).join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", d);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2457c5");
  svg.append(line);
  return svg;
}

async function queuesView() {
  const r = await api("GET", "/queues?limit=1000");
  const rows = r.queues.map((q) => {
    const s = q.stats;
    const h = history.get(q.name) || [];
    h.push(s.dispatches_per_second);
    if (h.length > HISTORY) h.shift();
    history.set(q.name, h);
    return el("tr", { class: "link", "data-queue": q.name, onclick: () => go(`#/queue/${encodeURIComponent(q.name)}`) },
      el("td", {}, q.name, q.paused ? el("span", { class: "paused" }, " (paused)") : ""),
      ...["scheduled", "running", "retrying", "failed", "succeeded", "cancelled"].map((k) => el("td", { class: "num" }, s[k])),
      el("td", { class: "num" }, s.dispatches_per_second.toFixed(2)),
      el("td", {}, sparkline(h)),
      el("td", { class: "num" }, s.lag.toFixed(1)));
  });
  return [
    el("h2", {}, "Queues"),
    el("table", { id: "queues" },
      el("thead", {}, el("tr", {}, el("th", {}, "queue"),
        ...["scheduled", "running", "retrying", "failed", "succeeded", "cancelled", "dispatches/s"].map((k) => el("th", { class: "num" }, k)),
        el("th", {}, "last minutes"), el("th", { class: "num" }, "lag (s)"))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 11 }, "No queues yet.")))),
  ];
}

let taskState = "";
let search = "";

async function queueView(name) {
  const q = await api("GET", `/queue/${encodeURIComponent(name)}`);
  let tasks = [];
  let found = null;
  if (search) {
    // By id first; else by name among the first pages of the listing.
    found = await api("GET", `/queue/${encodeURIComponent(name)}/tasks/${encodeURIComponent(search)}`).catch(() => null);
    if (!found) {
      let cursor = "";
      for (let page = 0; page < 10 && !found; page++) {
        const r = await api("GET", `/queue/${encodeURIComponent(name)}/tasks?limit=1000&cursor=${encodeURIComponent(cursor)}`);
        found = r.tasks.find((t) => t.name === search) || null;
        if (!r.next_cursor) break;
        cursor = r.next_cursor;
      }
    }
    tasks = found ? [found] : [];
  } else {
    const stateQ = taskState ? `&state=${taskState}` : "";
    const r = await api("GET", `/queue/${encodeURIComponent(name)}/tasks?limit=100${stateQ}`);
    tasks = r.tasks;
  }
  const act = async (what) => {
    if (what === "purge" && !confirm(`Purge every task of ${name}? This cannot be undone.`)) return;
    await api("POST", `/queue/${encodeURIComponent(name)}/${what}`);
    refresh();
  };
  const tab = (state, label) => el("button", { "aria-pressed": String(taskState === state), "data-state": state || "all",
    onclick: () => { taskState = state; search = ""; refresh(); } }, label);
  const searchBox = el("input", { id: "search", placeholder: "task id or name", value: search });
  searchBox.addEventListener("keydown", (e) => { if (e.key === "Enter") { search = searchBox.value.trim(); refresh(); } });
  const s = q.stats;
  return [
    el("h2", {}, `Queue ${name} `, q.paused ? el("span", { class: "paused", id: "paused" }, "paused") : ""),
    el("p", {}, `${s.scheduled} scheduled, ${s.running} running, ${s.retrying} retrying, ${s.failed} dead letters, ${s.succeeded} succeeded, ${s.cancelled} cancelled; ${s.dispatches_per_second.toFixed(2)} dispatches/s, lag ${s.lag.toFixed(1)} s.`),
    el("div", { class: "bar" },
      q.paused ? el("button", { id: "resume", onclick: () => act("resume") }, "Resume")
               : el("button", { id: "pause", onclick: () => act("pause") }, "Pause"),
      el("button", { id: "purge", class: "danger", onclick: () => act("purge") }, "Purge…"),
      searchBox,
      el("button", { onclick: () => { search = searchBox.value.trim(); refresh(); } }, "Search")),
    el("div", { class: "bar tabs" }, tab("", "All"), tab("scheduled", "Scheduled"), tab("running", "Running"),
      tab("retrying", "Retrying"), tab("failed", "Dead letters"), tab("succeeded", "Succeeded"), tab("cancelled", "Cancelled")),
    el("table", { id: "tasks" },
      el("thead", {}, el("tr", {}, ...["id", "name", "state", "attempts", "last status", "eta", "url"].map((k) => el("th", {}, k)))),
      el("tbody", {}, tasks.length ? tasks.map((t) => el("tr", { class: "link", "data-task": t.id,
        onclick: () => go(`#/queue/${encodeURIComponent(name)}/task/${encodeURIComponent(t.id)}`) },
        el("td", {}, t.id), el("td", {}, t.name || ""), el("td", {}, t.state), el("td", { class: "num" }, t.attempts),
        el("td", {}, t.last_status ?? ""), el("td", {}, fmtTime(t.eta)), el("td", {}, t.url)))
        : el("tr", {}, el("td", { colspan: 7 }, search ? "No task with that id or name." : "No tasks.")))),
  ];
}

async function taskView(queue, id) {
  const path = `/queue/${encodeURIComponent(queue)}/tasks/${encodeURIComponent(id)}`;
  const t = await api("GET", path + "?view=full");
  const row = (k, v) => [el("dt", {}, k), el("dd", {}, v ?? "")];
  const runAgain = async () => { await api("POST", path + "/run"); refresh(); };
  const remove = async () => {
    if (!confirm(`Delete task ${id}?`)) return;
    await api("DELETE", path);
    go(`#/queue/${encodeURIComponent(queue)}`);
  };
  return [
    el("h2", {}, `Task ${t.id}`),
    el("div", { class: "bar" },
      el("button", { onclick: () => go(`#/queue/${encodeURIComponent(queue)}`) }, `← ${queue}`),
      el("button", { id: "run", onclick: runAgain }, t.state === "failed" ? "Run again" : "Run now"),
      el("button", { id: "delete", class: "danger", onclick: remove }, "Delete…")),
    el("dl", { id: "detail" },
      row("state", t.state), row("name", t.name), row("url", `${t.method} ${t.url}`),
      row("attempts", t.attempts), row("executions", t.executions), row("last status", t.last_status),
      row("last error", t.last_error), row("eta", fmtTime(t.eta)), row("created", fmtTime(t.created)),
      row("first attempt", fmtTime(t.first_attempt)), row("holders", (t.holders || []).join(", ")),
      row("headers", el("pre", {}, (t.headers || []).map(([k, v]) => `${k}: ${v}`).join("\n"))),
      row("params", el("pre", {}, (t.params || []).map(([k, v]) => `${k}=${v}`).join("\n"))),
      row("last response", el("pre", {}, t.last_response || ""))),
  ];
}

async function clusterView() {
  const c = await api("GET", "/cluster");
  return [
    el("h2", {}, "Cluster"),
    el("p", {}, `term ${c.term}, roster epoch ${c.epoch}, ${c.replicas} copies of each task`),
    el("table", { id: "nodes" },
      el("thead", {}, el("tr", {}, ...["node", "id", "leader", "health", "tasks held", "client endpoint"].map((k) => el("th", {}, k)))),
      el("tbody", {}, (c.nodes || []).map((n) => el("tr", {},
        el("td", {}, n.name), el("td", {}, n.id), el("td", {}, n.leader ? "leader" : ""),
        el("td", { class: n.alive ? "alive" : "dead" }, n.alive ? "up" : "not heard from"),
        el("td", { class: "num" }, n.tasks), el("td", {}, n.client))))),
  ];
}

function go(hash) {
  if (location.hash === hash) refresh();
  else location.hash = hash;
}

async function refresh(auto) {
  clearTimeout(timer);
  // Someone typing in the page: leave it alone until they are done.
  if (auto === true && document.activeElement && document.activeElement.tagName === "INPUT") {
    timer = setTimeout(() => refresh(true), REFRESH_MS);
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    let content;
    if (parts[0] === "queue" && parts[2] === "task") content = await taskView(parts[1], parts[3]);
    else if (parts[0] === "queue" && parts[1]) content = await queueView(parts[1]);
    else if (parts[0] === "cluster") content = await clusterView();
    else content = await queuesView();
    $("#view").replaceChildren(...content);
    $("#token-box").hidden = true;
    status("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    status("error: " + e.message);
  }
  if (!document.hidden) timer = setTimeout(() => refresh(true), REFRESH_MS);
}

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("miyamoto-token", $("#token").value.trim());
  refresh();
});
window.addEventListener("hashchange", () => { taskState = ""; search = ""; refresh(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
refresh();
