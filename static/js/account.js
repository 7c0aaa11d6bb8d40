// The user's page: balance, this month's usage against quota, spend per day, API keys.

import { api, readJsonScript, results } from "./api.js";
import { formatMoney } from "./money.js";
import { barChartSvg } from "./svgchart.js";

const config = readJsonScript("page-config", { currency: "" });
const $ = (id) => document.getElementById(id);

function money(value, currency = config.currency) {
  // The one money format (static/js/money.js): the server's string, trimmed, never rounded through a float.
  return formatMoney(value, currency) || "—";
}

function dateText(value) {
  if (!value) return "—";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

function failed(node, err) {
  node.replaceChildren();
  const p = document.createElement("p");
  p.className = "muted";
  p.textContent = `Could not load: ${err.message}`;
  node.appendChild(p);
}

async function loadBalance() {
  try {
    const data = await api("/api/usage/balance/");
    $("balance").textContent = money(data.available ?? data.balance, data.currency);
    const reserved = data.reserved && Number(data.reserved) !== 0 ? ` · ${money(data.reserved, data.currency)} held for replies in progress` : "";
    $("balance-detail").textContent = `Balance ${money(data.balance, data.currency)}${reserved}`;
  } catch (err) {
    $("balance").textContent = "—";
    $("balance-detail").textContent = `Could not load the balance: ${err.message}`;
  }
}

function quotaBar(label, used, limit, format) {
  const row = document.createElement("div");
  row.className = "quota";
  const title = document.createElement("div");
  title.className = "quota-label";
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = "fill";
  bar.appendChild(fill);
  if (limit) {
    const pct = Math.min(100, (Number(used) / Number(limit)) * 100);
    fill.style.width = `${pct}%`;
    fill.classList.toggle("warn", pct >= 80);
    fill.classList.toggle("over", pct >= 100);
    title.textContent = `${label}: ${format(used)} of ${format(limit)} (${pct.toFixed(0)}%)`;
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuenow", pct.toFixed(0));
  } else {
    fill.style.width = "0%";
    title.textContent = `${label}: ${format(used)} (no limit)`;
  }
  row.append(title, bar);
  return row;
}

async function loadQuota() {
  const box = $("quota-bars");
  try {
    const q = await api("/api/usage/quota/");
    const usage = q.usage || {};
    const limits = q.limits || {};
    box.replaceChildren(
      quotaBar("Tokens", usage.tokens || 0, limits.tokens, (v) => Number(v).toLocaleString()),
      quotaBar("Cost", usage.cost || "0", limits.cost, (v) => money(v)),
    );
    if (q.period) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = `Month from ${q.period.start} (${q.period.time_zone || ""}).`;
      box.appendChild(p);
    }
    if (q.alert && q.alert.message) {
      const p = document.createElement("p");
      p.className = `alert alert-${q.alert.level}`;
      p.textContent = q.alert.message;
      box.appendChild(p);
    }
  } catch (err) {
    failed(box, err);
  }
}

function isoDay(d) {
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

async function loadSpend() {
  const box = $("spend-chart");
  const start = new Date(Date.now() - 29 * 86400000);
  try {
    // No end: the server's today, in the quota time zone, which may be a day ahead of the browser's.
    const data = await api(`/api/usage/stats/?group_by=day&start=${isoDay(start)}`);
    const byDay = new Map((data.by_day || []).map((row) => [row.day, row]));
    // Days are the server's (quota time zone): walk from its start to its end.
    const days = [];
    const last = Date.parse(`${data.end}T00:00:00Z`);
    for (let t = Date.parse(`${data.start}T00:00:00Z`); t <= last; t += 86400000) {
      days.push(new Date(t).toISOString().slice(0, 10));
    }
    const items = days.map((day) => [day.slice(5), Number((byDay.get(day) || {}).cost || 0)]);
    box.innerHTML = barChartSvg(items, { title: `Spend per day (${data.currency || config.currency})` });
    const total = data.totals ? money(data.totals.cost, data.currency) : "";
    if (total) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = `Last 30 days: ${total}, ${(data.totals.total_tokens || 0).toLocaleString()} tokens, ${data.totals.calls || 0} calls.`;
      box.appendChild(p);
    }
  } catch (err) {
    failed(box, err);
  }
}

// --- the user's own calls: per model, then one by one, for a date range ------------------------------------

const CALLS_PAGE = 50;
let callsOffset = 0;

function callsQuery() {
  const params = new URLSearchParams();
  if ($("calls-start").value) params.set("start", $("calls-start").value);
  if ($("calls-end").value) params.set("end", $("calls-end").value);
  return params;
}

function cells(tr, values) {
  for (const text of values) tr.insertCell().textContent = text;
}

function emptyRow(body, colspan, text) {
  const td = body.insertRow().insertCell();
  td.colSpan = colspan;
  td.className = "muted";
  td.textContent = text;
}

async function loadCalls() {
  const params = callsQuery();
  const modelRows = $("model-rows");
  try {
    params.set("group_by", "model");
    const stats = await api(`/api/usage/stats/?${params}`);
    modelRows.replaceChildren();
    for (const row of stats.by_model || []) {
      cells(modelRows.insertRow(), [row.model || "—", String(row.calls || 0), (row.total_tokens || 0).toLocaleString(),
                                    money(row.cost, stats.currency), String(row.errors || 0)]);
    }
    if (!(stats.by_model || []).length) emptyRow(modelRows, 5, "No calls in this range.");
    const t = stats.totals || {};
    $("calls-summary").textContent = `${stats.start} to ${stats.end}: ${t.calls || 0} calls, `
      + `${(t.total_tokens || 0).toLocaleString()} tokens, ${money(t.cost, stats.currency)}.`;
    if (!$("calls-start").value && stats.start) $("calls-start").value = stats.start;
    if (!$("calls-end").value && stats.end) $("calls-end").value = stats.end;
  } catch (err) {
    modelRows.replaceChildren();
    emptyRow(modelRows, 5, `Could not load: ${err.message}`);
  }
  callsOffset = 0;
  $("call-rows").replaceChildren();
  await loadMoreCalls();
}

async function loadMoreCalls() {
  const body = $("call-rows");
  const params = callsQuery();
  params.set("limit", String(CALLS_PAGE));
  params.set("offset", String(callsOffset));
  try {
    const data = await api(`/api/usage/records/?${params}`);
    const rows = results(data);
    for (const r of rows) {
      const tr = body.insertRow();
      tr.dataset.recordId = String(r.id);
      cells(tr, [dateText(r.created_at), r.model || "—", r.entry_point || "", `${r.prompt_tokens} / ${r.completion_tokens}`,
                 money(r.cost), r.status + (r.estimated ? " (estimated)" : ""), r.latency_ms ? `${r.latency_ms} ms` : "—"]);
    }
    callsOffset += rows.length;
    if (!body.rows.length) emptyRow(body, 7, "No calls in this range.");
    $("calls-more").hidden = !data.next;
  } catch (err) {
    emptyRow(body, 7, `Could not load: ${err.message}`);
  }
}

$("calls-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  loadCalls();
});
$("calls-more").addEventListener("click", loadMoreCalls);

// --- API keys -------------------------------------------------------------------

function keyState(k) {
  if (k.revoked_at || k.revoked) return "revoked";
  if (k.expires_at && new Date(k.expires_at) <= new Date()) return "expired";
  return "active";
}

async function loadKeys() {
  const body = $("key-rows");
  let keys;
  try {
    keys = results(await api("/api/keys/"));
  } catch (err) {
    body.innerHTML = "";
    const tr = body.insertRow();
    const td = tr.insertCell();
    td.colSpan = 7;
    td.textContent = `Could not load keys: ${err.message}`;
    return;
  }
  body.replaceChildren();
  if (!keys.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = 7;
    td.className = "muted";
    td.textContent = "No keys yet.";
  }
  for (const k of keys) {
    const tr = body.insertRow();
    tr.dataset.keyId = String(k.id);
    const state = keyState(k);
    tr.className = `key-${state}`;
    for (const text of [k.name, `${k.prefix || ""}…`, k.project || "", dateText(k.created_at), dateText(k.last_used_at), state]) {
      tr.insertCell().textContent = text;
    }
    const cell = tr.insertCell();
    if (state === "active") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger revoke";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revokeKey(k, button));
      cell.appendChild(button);
    }
  }
}

async function revokeKey(k, button) {
  if (!window.confirm(`Revoke the key "${k.name}"? Apps using it stop working at once.`)) return;
  button.disabled = true;
  try {
    await api(`/api/keys/${k.id}/`, { method: "DELETE" });
  } catch (err) {
    button.disabled = false;
    window.alert(`Could not revoke the key: ${err.message}`);
    return;
  }
  await loadKeys();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("key-name").value.trim();
  if (!name) return;
  const button = $("create-key");
  button.disabled = true;
  try {
    const data = await api("/api/keys/", { method: "POST", body: { name } });
    $("new-key-value").textContent = data.key || data.raw_key || data.secret || "";
    $("new-key").hidden = false;
    $("key-name").value = "";
    await loadKeys();
  } catch (err) {
    window.alert(`Could not create the key: ${err.message}`);
  } finally {
    button.disabled = false;
  }
});

$("copy-key").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("new-key-value").textContent);
    $("copy-key").textContent = "Copied";
  } catch {
    window.getSelection().selectAllChildren($("new-key-value"));
  }
});

loadBalance();
loadQuota();
loadSpend();
loadCalls();
loadKeys();
