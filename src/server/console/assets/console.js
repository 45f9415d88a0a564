// The llm-gateway console: plain JavaScript over the gateway's JSON API
// (POST /<package>.<Service>/<Method>, the proto3 JSON mapping). No framework, nothing
// loaded from anywhere but the gateway.
"use strict";

const ADMIN = "llmgateway.v1.LlmGatewayAdmin";
const GATEWAY = "llmgateway.v1.LlmGateway";
const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));
const COLORS = ["#2f6fde", "#e67e22", "#1e8449", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d35400"];

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "unknown";
    this.details = body.details || [];
  }
  violations() {
    const bad = this.details.find((d) => d.type === "google.rpc.BadRequest");
    return bad ? bad.fieldViolations : [];
  }
}

// One unary call of the JSON API.
async function rpc(service, method, body, headers = {}) {
  const res = await fetch(`/${service}/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const text = await res.text();
  const json = text ? JSON.parse(text) : {};
  if (!res.ok) {
    const err = new ApiError(res.status, json);
    if (res.status === 401) showLogin(err.message);
    throw err;
  }
  return json;
}

// A server-streaming call: calls onMessage for each NDJSON line; throws the stream's error.
async function rpcStream(service, method, body, onMessage, headers = {}) {
  const res = await fetch(`/${service}/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  if (!res.ok) {
    const json = await res.json().catch(() => ({}));
    throw new ApiError(res.status, json);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line) continue;
      const msg = JSON.parse(line);
      if (msg.error) throw new ApiError(0, msg.error);
      onMessage(msg);
    }
  }
}

// ---- formatting ---------------------------------------------------------------------------
const seconds = (d) => (d ? parseFloat(String(d).replace("s", "")) : 0);
const fmtS = (d) => (d ? `${seconds(d).toFixed(3)} s` : "–");
const fmtUsd = (x) => `$${(x || 0).toFixed(x >= 1 ? 2 : 6)}`;
const fmtNum = (x) => Number(x || 0).toLocaleString("en-US");
const fmtPct = (x) => `${((x || 0) * 100).toFixed(1)}%`;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function table(target, columns, rows) {
  const t = typeof target === "string" ? $(target) : target;
  t.replaceChildren();
  const head = el("tr");
  columns.forEach((c) => head.append(el("th", { class: c.num ? "num" : "" }, c.title)));
  t.append(el("thead", {}, head));
  const body = el("tbody");
  for (const r of rows) {
    const tr = el("tr");
    for (const c of columns) {
      const v = c.render ? c.render(r) : r[c.key];
      tr.append(el("td", { class: c.num ? "num" : "" }, v instanceof Node ? v : String(v ?? "")));
    }
    body.append(tr);
  }
  t.append(body);
  return t;
}

function message(target, text, ok = false) {
  const box = $(target);
  box.replaceChildren(el("p", { class: ok ? "ok" : "error" }, text));
}

function errorMessages(target, err) {
  const box = $(target);
  box.replaceChildren(el("p", { class: "error" }, `${err.code}: ${err.message}`));
  for (const v of err.violations ? err.violations() : []) {
    box.append(el("p", { class: "error violation" }, `${v.field}: ${v.description}`));
  }
}

// ---- charts (SVG) -------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// series: [{name, points: [[t, y], ...]}]
function lineChart(target, series, yFormat = (y) => y.toPrecision(3)) {
  const box = $(target);
  box.replaceChildren();
  const W = 600, H = 180, L = 62, B = 20, T = 8, R = 8;
  const all = series.flatMap((s) => s.points);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  if (!all.length) {
    chart.append(Object.assign(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }), { textContent: "no calls in this range" }));
    box.append(chart);
    return;
  }
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const yMax = Math.max(...all.map((p) => p[1]), 1e-9) * 1.1;
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => H - B - (v / yMax) * (H - B - T);
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  chart.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const f of [0, 0.5, 1]) {
    const label = svg("text", { x: L - 4, y: y(yMax * f / 1.1) + 3, "text-anchor": "end" });
    label.textContent = yFormat(yMax * f / 1.1);
    chart.append(label);
  }
  for (const t of [t0, t1]) {
    const label = svg("text", { x: x(t), y: H - 6, "text-anchor": t === t0 ? "start" : "end" });
    const long = t1 - t0 > 6 * 3600 * 1000;
    label.textContent = long
      ? new Date(t).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" })
      : new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    chart.append(label);
  }
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    chart.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 2, "data-series": s.name }));
    for (const p of s.points) chart.append(svg("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: color }));
    const item = el("span", {}, s.name);
    item.style.setProperty("--swatch", color);
    legend.append(item);
  });
  box.append(chart, legend);
}

// ---- pages --------------------------------------------------------------------------------
function showLogin(why) {
  $("#nav").hidden = true;
  $$(".page").forEach((p) => (p.hidden = true));
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
}

function show(page) {
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $$(".page").forEach((p) => (p.hidden = p.id !== page));
  $$("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const load = PAGES[page];
  if (load) load().catch((err) => console.warn(page, err));
}

const ts = (ms) => new Date(ms).toISOString();

async function overview() {
  const range = Number($("#ov-range").value) * 1000;
  const tag = $("#ov-tag").value.trim();
  const group = tag ? `tag:${tag}` : $("#ov-group").value;
  const end = Date.now(), start = end - range, buckets = 12, step = range / buckets;
  const calls = [];
  for (let i = 0; i < buckets; i++) {
    const from = start + i * step;
    calls.push(rpc(ADMIN, "GetUsage", { startTime: ts(from), endTime: ts(from + step), groupBy: [group] })
      .then((r) => ({ at: from + step / 2, r })));
  }
  const [slices, whole, codes, health] = await Promise.all([
    Promise.all(calls),
    rpc(ADMIN, "GetUsage", { startTime: ts(start), endTime: ts(end) }),
    rpc(ADMIN, "GetUsage", { startTime: ts(start), endTime: ts(end), groupBy: ["code"] }),
    rpc(ADMIN, "ListProviders", {}).catch(() => ({ targets: [] })),
  ]);
  const t = whole.total || {};
  $("#ov-totals").replaceChildren(
    ...[["calls", fmtNum(t.calls)], ["error rate", fmtPct(t.errorRate)], ["p50", fmtS(t.latencyP50)],
      ["p95", fmtS(t.latencyP95)], ["TTFT p95", fmtS(t.timeToFirstTokenP95)],
      ["tokens", fmtNum(Number(t.inputTokens || 0) + Number(t.outputTokens || 0))], ["cost", fmtUsd(t.costUsd)]]
      .map(([k, v]) => el("div", {}, k, el("b", {}, v))));
  const names = new Set();
  slices.forEach(({ r }) => (r.groups || []).forEach((g) => names.add(g.key[group] ?? "")));
  const series = (f) => [...names].sort().map((name) => ({
    name: name || "(none)",
    points: slices.map(({ at, r }) => {
      const g = (r.groups || []).find((g) => (g.key[group] ?? "") === name);
      return [at, g ? f(g.totals) : 0];
    }),
  }));
  const hours = step / 3600000;
  lineChart("#ch-calls", series((x) => Number(x.calls) / (step / 1000)));
  lineChart("#ch-errors", series((x) => x.errorRate || 0), fmtPct);
  lineChart("#ch-latency", [...series((x) => seconds(x.latencyP50)).map((s) => ({ ...s, name: `p50 ${s.name}` })),
    ...series((x) => seconds(x.latencyP95)).map((s) => ({ ...s, name: `p95 ${s.name}` }))]);
  lineChart("#ch-ttft", [...series((x) => seconds(x.timeToFirstTokenP50)).map((s) => ({ ...s, name: `p50 ${s.name}` })),
    ...series((x) => seconds(x.timeToFirstTokenP95)).map((s) => ({ ...s, name: `p95 ${s.name}` }))]);
  lineChart("#ch-tokens", series((x) => (Number(x.inputTokens) + Number(x.outputTokens)) / hours), (y) => fmtNum(Math.round(y)));
  lineChart("#ch-cost", series((x) => (x.costUsd || 0) / hours), fmtUsd);
  const errors = (codes.groups || []).filter((g) => g.key.code !== "OK")
    .sort((a, b) => Number(b.totals.calls) - Number(a.totals.calls)).slice(0, 8);
  table("#ov-errors", [{ title: "code", render: (g) => g.key.code }, { title: "calls", num: true, render: (g) => fmtNum(g.totals.calls) }], errors);
  table("#ov-targets", [
    { title: "target", render: (h) => `${h.provider}/${h.model}` },
    { title: "circuit", render: (h) => circuit(h.circuit) },
    { title: "resting", render: (h) => (h.cooldownRemaining && seconds(h.cooldownRemaining) > 0 ? fmtS(h.cooldownRemaining) : "") },
    { title: "error rate", num: true, render: (h) => fmtPct(h.errorRate) },
    { title: "p95", num: true, render: (h) => fmtS(h.latencyP95) },
  ], health.targets || []);
}

function circuit(state) {
  const s = String(state || "").replace("CIRCUIT_STATE_", "").toLowerCase();
  const cls = s === "open" ? "state-open" : s.startsWith("half") ? "state-half" : "";
  return el("span", { class: cls }, s || "closed");
}

// ---- policies -----------------------------------------------------------------------------
let editing = null; // the policy name being edited, or null for a new one

async function policies() {
  const list = await rpc(ADMIN, "ListPolicies", {});
  table("#pol-list", [
    { title: "name", render: (p) => el("a", { href: "#policies", onclick: (e) => { e.preventDefault(); edit(p); } }, p.name) },
    { title: "strategy", render: (p) => String(p.strategy || "").replace("STRATEGY_", "").toLowerCase() },
    { title: "targets", render: (p) => (p.targets || []).map((t) => `${t.provider}/${t.model}`).join(", ") },
    { title: "source", render: (p) => String(p.source || "").replace("POLICY_SOURCE_", "").toLowerCase() },
    { title: "etag", key: "etag" },
  ], list.policies || []);
}

function edit(policy) {
  editing = policy ? policy.name : null;
  $("#pol-editor").hidden = false;
  $("#pol-title").textContent = policy ? `Policy ${policy.name}` : "New policy";
  const shown = policy ? { ...policy } : { name: "", targets: [{ provider: "", model: "" }] };
  delete shown.createTime; delete shown.updateTime; delete shown.source;
  $("#pol-json").value = JSON.stringify(shown, null, 2);
  $("#pol-messages").replaceChildren();
  $("#pol-plan").replaceChildren();
  $("#pol-delete").hidden = !policy;
}

function editedPolicy() {
  try {
    return JSON.parse($("#pol-json").value);
  } catch (e) {
    message("#pol-messages", `not JSON: ${e.message}`);
    return null;
  }
}

async function savePolicy() {
  const policy = editedPolicy();
  if (!policy) return;
  try {
    const method = editing ? "UpdatePolicy" : "CreatePolicy";
    const saved = await rpc(ADMIN, method, { policy });
    edit(saved.policy);
    message("#pol-messages", `saved: etag ${saved.policy.etag}`, true);
    await policies();
  } catch (err) {
    errorMessages("#pol-messages", err);
    if (err.code === "aborted") {
      $("#pol-messages").append(el("p", { class: "error conflict" }, "Someone else saved this policy since you opened it: reload it, re-apply your change, and save again."));
    }
  }
}

async function validatePolicy() {
  const policy = editedPolicy();
  if (!policy) return;
  try {
    const r = await rpc(ADMIN, "ValidatePolicy", { policy });
    const problems = r.violations || r.fieldViolations || [];
    if (problems.length) {
      $("#pol-messages").replaceChildren(...problems.map((v) => el("p", { class: "error violation" }, `${v.field}: ${v.description}`)));
    } else {
      message("#pol-messages", "valid", true);
    }
  } catch (err) {
    errorMessages("#pol-messages", err);
  }
}

async function deletePolicy() {
  const policy = editedPolicy();
  if (!policy || !editing) return;
  try {
    await rpc(ADMIN, "DeletePolicy", { name: editing, etag: policy.etag || "" });
    $("#pol-editor").hidden = true;
    await policies();
  } catch (err) {
    errorMessages("#pol-messages", err);
  }
}

async function explain() {
  const policy = editedPolicy();
  if (!policy) return;
  try {
    const r = await rpc(ADMIN, "ExplainRoute", { request: { model: policy.name || editing, messages: [{ role: "ROLE_USER", content: [{ text: $("#pol-sample").value }] }] } });
    table("#pol-plan", [
      { title: "rank", num: true, key: "rank" },
      { title: "target", render: (c) => `${c.provider}/${c.model}` },
      { title: "chosen", render: (c) => (c.chosen ? "yes" : "") },
      { title: "reason", key: "reason" },
      { title: "p50", num: true, render: (c) => fmtS(c.latencyP50) },
      { title: "est. cost", num: true, render: (c) => (c.estimatedCostUsd != null ? fmtUsd(c.estimatedCostUsd) : "") },
    ], r.candidates || []);
    if (r.unroutableReason) $("#pol-plan").append(el("caption", { class: "error" }, r.unroutableReason));
  } catch (err) {
    errorMessages("#pol-messages", err);
  }
}

// ---- keys ---------------------------------------------------------------------------------
function spendBar(spent, budget) {
  if (!budget) return el("span", { class: "hint" }, spent ? fmtUsd(spent) : "");
  const share = Math.min(spent / budget, 1);
  const fill = el("i", { class: share >= 1 ? "over" : share >= 0.8 ? "warn" : "" });
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  return el("div", { title: `${fmtUsd(spent)} of ${fmtUsd(budget)}` }, el("div", { class: "bar" }, fill), `${fmtUsd(spent)} / ${fmtUsd(budget)}`);
}

async function keys() {
  const list = await rpc(ADMIN, "ListKeys", {});
  table("#key-list", [
    { title: "name", key: "name" },
    { title: "owner", key: "owner" },
    { title: "scopes", render: (k) => (k.scopes || []).join(", ") },
    { title: "req/min", num: true, render: (k) => limitInput(k, "requestsPerMinute") },
    { title: "daily budget", num: true, render: (k) => limitInput(k, "dailyBudgetUsd") },
    { title: "today", render: (k) => spendBar(k.spentTodayUsd || 0, k.dailyBudgetUsd || 0) },
    { title: "this month", render: (k) => spendBar(k.spentThisMonthUsd || 0, k.monthlyBudgetUsd || 0) },
    { title: "state", render: (k) => (k.revoked ? "revoked" : "active") },
    { title: "", render: (k) => (k.revoked ? "" : el("button", { type: "button", class: "quiet revoke", onclick: () => revoke(k) }, "Revoke")) },
  ], list.keys || []);
}

function limitInput(key, field) {
  const input = el("input", { type: "number", min: "0", step: field.endsWith("Usd") ? "0.01" : "1", value: String(key[field] || 0), size: "6", "data-key": key.name, "data-field": field });
  input.addEventListener("change", async () => {
    const updated = { ...key, [field]: Number(input.value) };
    try {
      await rpc(ADMIN, "UpdateKey", { key: updated });
      message("#key-messages", `${key.name}: ${field} is now ${input.value}`, true);
      await keys();
    } catch (err) {
      errorMessages("#key-messages", err);
    }
  });
  return input;
}

async function createKey(e) {
  e.preventDefault();
  const f = new FormData(e.target);
  const key = {
    name: f.get("name"),
    owner: f.get("owner"),
    scopes: String(f.get("scopes")).split(",").map((s) => s.trim()).filter(Boolean),
    requestsPerMinute: Number(f.get("requestsPerMinute")),
    dailyBudgetUsd: Number(f.get("dailyBudgetUsd")),
    monthlyBudgetUsd: Number(f.get("monthlyBudgetUsd")),
  };
  try {
    const r = await rpc(ADMIN, "CreateKey", { key });
    const box = $("#key-secret");
    box.hidden = false;
    box.replaceChildren(el("p", {}, `The secret of ${r.key.name}, shown once: copy it now.`), el("code", { id: "new-secret" }, r.secret));
    $("#key-messages").replaceChildren();
    e.target.reset();
    await keys();
  } catch (err) {
    errorMessages("#key-messages", err);
  }
}

async function revoke(key) {
  if (!confirm(`Revoke ${key.name}? Calls with it fail from now on.`)) return;
  try {
    await rpc(ADMIN, "RevokeKey", { name: key.name });
    message("#key-messages", `${key.name} revoked`, true);
    await keys();
  } catch (err) {
    errorMessages("#key-messages", err);
  }
}

// ---- usage explorer -----------------------------------------------------------------------
let usageRows = [], usageSort = { col: "calls", desc: true };

function usageRange() {
  const from = $("#us-from").value ? new Date($("#us-from").value) : new Date(Date.now() - 86400000);
  const to = $("#us-to").value ? new Date($("#us-to").value) : new Date();
  return { startTime: from.toISOString(), endTime: to.toISOString() };
}

async function usage() {
  const groupBy = $("#us-group").value.split(",").map((s) => s.trim()).filter(Boolean);
  const filter = {};
  for (const pair of $("#us-filter").value.split(",").map((s) => s.trim()).filter(Boolean)) {
    const [k, ...v] = pair.split("=");
    filter[k.trim()] = v.join("=").trim();
  }
  try {
    const r = await rpc(ADMIN, "GetUsage", { ...usageRange(), groupBy, filter });
    $("#us-messages").replaceChildren();
    usageRows = (r.groups || []).map((g) => ({ ...g.key, calls: Number(g.totals.calls), errors: Number(g.totals.errors), errorRate: g.totals.errorRate || 0, inputTokens: Number(g.totals.inputTokens), outputTokens: Number(g.totals.outputTokens), costUsd: g.totals.costUsd || 0, p50: seconds(g.totals.latencyP50), p95: seconds(g.totals.latencyP95) }));
    renderUsage(groupBy);
  } catch (err) {
    errorMessages("#us-messages", err);
  }
}

function renderUsage(groupBy) {
  const cols = [...groupBy.map((g) => ({ title: g, key: g })),
    { title: "calls", key: "calls", num: true }, { title: "errors", key: "errors", num: true },
    { title: "error rate", key: "errorRate", num: true, render: (r) => fmtPct(r.errorRate) },
    { title: "input tokens", key: "inputTokens", num: true }, { title: "output tokens", key: "outputTokens", num: true },
    { title: "cost", key: "costUsd", num: true, render: (r) => fmtUsd(r.costUsd) },
    { title: "p50 s", key: "p50", num: true, render: (r) => r.p50.toFixed(3) }, { title: "p95 s", key: "p95", num: true, render: (r) => r.p95.toFixed(3) }];
  const { col, desc } = usageSort;
  const rows = [...usageRows].sort((a, b) => (a[col] > b[col] ? 1 : a[col] < b[col] ? -1 : 0) * (desc ? -1 : 1));
  const t = table("#us-table", cols, rows);
  t.querySelectorAll("th").forEach((th, i) => th.addEventListener("click", () => {
    const key = cols[i].key;
    usageSort = { col: key, desc: usageSort.col === key ? !usageSort.desc : true };
    renderUsage(groupBy);
  }));
}

const CSV_COLUMNS = ["timeMs", "requestId", "rpc", "key", "policy", "provider", "model", "attempts", "inputTokens", "outputTokens", "cachedInputTokens", "costUsd", "latencyMs", "ttftMs", "code", "errorClass"];
function csvCell(v) {
  const s = v == null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

async function downloadCsv() {
  const lines = [[...CSV_COLUMNS, "tags"].join(",")];
  try {
    await rpcStream(ADMIN, "ExportUsage", usageRange(), (msg) => {
      for (const r of msg.records || []) lines.push([...CSV_COLUMNS.map((c) => csvCell(r[c])), csvCell(r.tags)].join(","));
    });
  } catch (err) {
    errorMessages("#us-messages", err);
    return;
  }
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "llm-gateway-usage.csv" });
  document.body.append(a);
  a.click();
  a.remove();
  message("#us-messages", `${lines.length - 1} records exported`, true);
}

// ---- playground ---------------------------------------------------------------------------
async function playground() {
  const [models, pols] = await Promise.all([
    rpc(GATEWAY, "ListModels", {}, chatHeaders()).catch(() => ({ models: [] })),
    rpc(ADMIN, "ListPolicies", {}).catch(() => ({ policies: [] })),
  ]);
  $("#pg-models").replaceChildren(
    ...(pols.policies || []).map((p) => el("option", { value: p.name })),
    ...(models.models || []).map((m) => el("option", { value: m.id })));
}

function chatHeaders() {
  const key = $("#pg-key").value.trim();
  // The calls go as the chat key given here, or as no one: the session's admin credential
  // is never used for chat.
  return key ? { authorization: `Bearer ${key}` } : {};
}

async function runOne(model, prompt, column) {
  const out = el("pre", { class: "reply" });
  const stats = el("p", { class: "hint stats" }, "…");
  column.replaceChildren(el("h4", {}, model), out, stats);
  const started = performance.now();
  let ttft = null;
  try {
    await rpcStream(GATEWAY, "ChatStream", { model, messages: [{ role: "ROLE_USER", content: [{ text: prompt }] }] }, (msg) => {
      if (msg.delta && msg.delta.text) {
        if (ttft === null) ttft = performance.now() - started;
        out.textContent += msg.delta.text;
      }
      if (msg.finish) {
        const u = msg.finish.usage || {};
        const c = msg.finish.cost || {};
        const ms = performance.now() - started;
        stats.textContent = `latency ${(ms / 1000).toFixed(3)} s · TTFT ${ttft === null ? "–" : (ttft / 1000).toFixed(3) + " s"} · tokens ${fmtNum(u.inputTokens)} in / ${fmtNum(u.outputTokens)} out · cost ${fmtUsd(c.totalUsd)}`;
        stats.dataset.done = "1";
      }
    }, chatHeaders());
  } catch (err) {
    stats.textContent = `${err.code}: ${err.message}`;
    stats.className = "error stats";
  }
}

async function runPlayground() {
  const prompt = $("#pg-prompt").value;
  const models = $$(".pg-model").map((i) => i.value.trim()).filter(Boolean);
  const results = $("#pg-results");
  results.replaceChildren();
  await Promise.all(models.map((m) => {
    const column = el("div", { class: "result" });
    results.append(column);
    return runOne(m, prompt, column);
  }));
}

const PAGES = { overview, policies, keys, usage, playground };

// ---- start --------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await fetch("/console/login", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token: $("#token").value }) });
    if (res.ok) {
      $("#token").value = "";
      show(location.hash.slice(1) || "overview");
    } else {
      const body = await res.json().catch(() => ({}));
      $("#login-error").textContent = body.message || `login failed (HTTP ${res.status})`;
    }
  });
  $("#logout").addEventListener("click", async () => {
    await fetch("/console/logout", { method: "POST" });
    showLogin("logged out");
  });
  $("#ov-refresh").addEventListener("click", () => overview().catch(() => {}));
  $("#pol-new").addEventListener("click", () => edit(null));
  $("#pol-save").addEventListener("click", savePolicy);
  $("#pol-validate").addEventListener("click", validatePolicy);
  $("#pol-delete").addEventListener("click", deletePolicy);
  $("#pol-explain").addEventListener("click", explain);
  $("#key-form").addEventListener("submit", createKey);
  $("#us-run").addEventListener("click", usage);
  $("#us-csv").addEventListener("click", downloadCsv);
  $("#pg-run").addEventListener("click", runPlayground);
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "overview"));
  // Logged in already (a session cookie) when a cheap read succeeds.
  const now = Date.now();
  rpc(ADMIN, "GetUsage", { startTime: ts(now - 1000), endTime: ts(now) }).then(() => show(location.hash.slice(1) || "overview"), () => showLogin(""));
});
