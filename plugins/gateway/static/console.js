// The AIWFE console: plain JavaScript served by the gateway, no build step, nothing fetched
// from elsewhere. State that must survive a reload (the token, the job on screen, its events
// and the last sequence seen of every followed job) lives in sessionStorage: one tab, one
// session. After a reload the page redraws the stored events and resumes each followed job
// after its last sequence, so no event is shown twice.
import {$, clear, el, short, when} from "./dom.js";
import {renderFrame, renderView} from "./jobview.js";

const store = window.sessionStorage;
const MAX_STORED_EVENTS = 1500;   // per job on screen (sessionStorage holds a few MB)

// What tests and curious users can read: frames received, duplicates dropped.
const stats = window.aiwfeConsole = {frames: [], duplicates: 0, resumed: []};

let token = store.getItem("aiwfe.token");
let username = store.getItem("aiwfe.user") || "";
let ws = null, wsRetry = 0, wsTimer = null;
let view = load("aiwfe.view", null);        // {job_id, kind, status, events: [frame...]}
let follow = load("aiwfe.follow", {});      // job_id -> last seq seen (jobs still running)
let asyncapi = null, kinds = [];

function load(key, fallback) {
  try { const v = JSON.parse(store.getItem(key)); return v === null ? fallback : v; } catch { return fallback; }
}
function save() {
  store.setItem("aiwfe.follow", JSON.stringify(follow));
  if (view) {
    if (view.events.length > MAX_STORED_EVENTS) view.events = view.events.slice(-MAX_STORED_EVENTS);
    try { store.setItem("aiwfe.view", JSON.stringify(view)); } catch { view.events = view.events.slice(-200); }
  } else store.removeItem("aiwfe.view");
}
class ApiError extends Error {
  constructor(status, detail, body) { super(detail); this.status = status; this.detail = detail; this.body = body; }
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.body ? {"Content-Type": "application/json"} : {}, opts.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, Object.assign({}, opts, {headers}));
  const json = (r.headers.get("content-type") || "").includes("json");
  const body = r.status === 204 ? null : json ? await r.json() : await r.text();
  if (!r.ok) {
    const detail = body && typeof body === "object" ? (body.detail || JSON.stringify(body)) : String(body);
    if (r.status === 401 && token && !path.startsWith("/v1/auth/")) loggedOut("session ended (" + detail + ")");
    throw new ApiError(r.status, detail, body);
  }
  return body;
}

// -- log in / out -------------------------------------------------------------------

function creds() { return JSON.stringify({username: $("username").value, password: $("password").value}); }

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("auth-error").textContent = "";
  try {
    const t = await api("/v1/auth/login", {method: "POST", body: creds()});
    token = t.access_token; username = $("username").value;
    store.setItem("aiwfe.token", token); store.setItem("aiwfe.user", username);
    $("password").value = "";
    await start();
  } catch (e) { $("auth-error").textContent = "login failed: " + e.message; }
});
$("register").onclick = async () => {
  $("auth-error").textContent = "";
  try {
    await api("/v1/auth/register", {method: "POST", body: creds()});
    $("auth-status").textContent = "registered; now log in";
  } catch (e) { $("auth-error").textContent = "register failed: " + e.message; }
};
$("logout").onclick = async () => {
  try { await api("/v1/auth/logout", {method: "POST"}); } catch { /* the token is dropped anyway */ }
  loggedOut("logged out");
};

function loggedOut(why) {
  token = null; username = ""; view = null; follow = {};
  for (const k of ["aiwfe.token", "aiwfe.user", "aiwfe.view", "aiwfe.follow"]) store.removeItem(k);
  if (ws) { const s = ws; ws = null; s.close(); }
  clearTimeout(wsTimer);
  // Nothing of this user stays on the page for the next one.
  renderView(view); clear($("history")); clear($("dlq")); inputError(""); $("dlq-status").textContent = "";
  $("open-id").value = ""; $("open-error").textContent = "";
  $("auth-status").textContent = why;
  $("logout").hidden = true; $("app").hidden = true; $("auth").hidden = false; $("dlq-panel").hidden = true;
}

async function start() {
  let me;
  try { me = await api("/v1/console/me"); } catch (e) {
    if (e.status !== 401) $("auth-error").textContent = "could not check the session: " + e.message;
    if (e.status !== 401) loggedOut("not logged in"); return;
  }
  $("auth-status").textContent = "logged in as " + me.username + (me.admin ? " (admin)" : "");
  $("logout").hidden = false; $("auth").hidden = true; $("app").hidden = false;
  $("dlq-panel").hidden = !me.admin;
  if (view) renderView(view);
  openSocket();
  loadKinds();
  refreshHistory();
  if (me.admin) refreshDeadLetters();
}

// -- the socket: follow jobs, resume after a reload or a drop -------------------------

function openSocket() {
  if (!token) return;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const s = ws = new WebSocket(`${proto}://${location.host}/v1/ws`, ["bearer", token]);
  $("ws-status").textContent = "connecting…";
  s.onopen = () => {
    wsRetry = 0;
    $("ws-status").textContent = "socket open";
    for (const [job_id, seq] of Object.entries(follow)) {
      stats.resumed.push({job_id, after_seq: seq});
      s.send(JSON.stringify({type: "resume", job_id, after_seq: seq, id: "resume-" + job_id}));
    }
  };
  s.onclose = (e) => {
    if (ws !== s) return;
    ws = null;
    $("ws-status").textContent = "socket closed (" + e.code + ")";
    if (e.code === 4001) { loggedOut("session ended: token revoked or expired (4001)"); return; }
    if (token) { wsTimer = setTimeout(openSocket, Math.min(10000, 500 * 2 ** wsRetry++)); }
  };
  s.onmessage = (m) => onFrame(JSON.parse(m.data));
}

function followJob(job_id, after_seq) {
  follow[job_id] = after_seq; save();
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "resume", job_id, after_seq, id: "open-" + job_id}));
}

function onFrame(f) {
  if (f.type === "event" || f.type === "result") {
    stats.frames.push({job_id: f.job_id, seq: f.seq, type: f.type});
    const last = follow[f.job_id];
    if (last !== undefined && f.seq <= last) { stats.duplicates++; return; }
    if (f.type === "result") delete follow[f.job_id]; else if (last !== undefined) follow[f.job_id] = f.seq;
    if (view && view.job_id === f.job_id) {
      view.events.push(f);
      if (f.type === "result") view.status = f.status;
      save(); renderFrame(view, f, true);
    } else save();
    if (f.type === "result") { refreshHistory(); refreshPods(); }
  } else if (f.type === "error") {
    const msg = (f.code ? f.code + ": " : "") + (f.message || "");
    if (f.job_id && follow[f.job_id] !== undefined && f.code === "not_found") { delete follow[f.job_id]; save(); }
    $("ws-status").textContent = "socket open — " + msg;
  } else if (f.type === "cancelled") {
    $("ws-status").textContent = f.cancelled ? "cancel sent" : "the job had already finished";
  }
}

// -- submitting: kinds, example input from the contract's schema, inline errors --------

async function loadKinds() {
  try {
    kinds = (await api("/v1/console/kinds")).kinds;
  } catch (e) { $("input-error").textContent = "kinds: " + e.message; return; }
  const sel = $("kind"), keep = store.getItem("aiwfe.kind");
  clear(sel);
  for (const k of kinds) sel.append(el("option", {value: k.kind, text: k.kind}));
  if (keep && kinds.some((k) => k.kind === keep)) sel.value = keep;
  await showKind(true);
}
$("kind").onchange = () => { store.setItem("aiwfe.kind", $("kind").value); showKind(true); };
$("example").onclick = () => showKind(true);

async function schemaFor(address) {
  if (!asyncapi) asyncapi = await api("/v1/asyncapi.json");
  const msg = (asyncapi.components.messages || {})["submit-" + address];
  return msg ? resolve(msg.payload) : null;
}
function resolve(s) {
  let hops = 0;
  while (s && s.$ref && hops++ < 20) {
    const path = s.$ref.replace(/^#\//, "").split("/");
    s = path.reduce((o, p) => (o ? o[p] : undefined), asyncapi);
  }
  return s;
}

// An example value for a JSON Schema: the example or default when there is one, else a
// placeholder of the right type. Objects list their required properties and those with a
// default; `type` (the contract's tag) and `owner` (set by the gateway) are left out.
function example(s, name, depth = 0) {
  s = resolve(s) || {};
  if (s.examples && s.examples.length) return s.examples[0];
  if (s.default !== undefined) return s.default;
  if (s.const !== undefined) return s.const;
  if (s.enum) return s.enum[0];
  if (s.anyOf || s.oneOf) {
    const alt = (s.anyOf || s.oneOf).find((a) => (resolve(a) || {}).type !== "null");
    return alt ? example(alt, name, depth) : null;
  }
  switch (s.type) {
    case "string": return name === "text" ? "Which database index speeds up customer lookups?" : "";
    case "integer": return Math.max(0, s.minimum || 0);
    case "number": return s.minimum || 0;
    case "boolean": return false;
    case "array": return [];
    case "object": {
      if (depth > 4) return {};
      const out = {}, req = new Set(s.required || []);
      for (const [k, p] of Object.entries(s.properties || {})) {
        if (depth === 0 && (k === "type" || k === "owner")) continue;
        const rp = resolve(p) || {};
        if (req.has(k) || (rp.default !== undefined && rp.default !== null)) out[k] = example(rp, k, depth + 1);
      }
      return out;
    }
    default: return null;
  }
}

async function showKind(fill) {
  const k = kinds.find((x) => x.kind === $("kind").value);
  if (!k) return;
  $("kind-address").textContent = "→ " + k.address;
  $("schema-help").textContent = "loading the contract's schema…";
  let schema = null;
  try { schema = await schemaFor(k.address); } catch (e) {
    $("schema-help").textContent = "schema not available (" + e.message + "); type the input by hand";
    return;
  }
  if (!schema) { $("schema-help").textContent = "no schema published for " + k.address; return; }
  const req = (schema.required || []).filter((f) => f !== "type");
  const fields = Object.keys(schema.properties || {}).filter((f) => f !== "type" && f !== "owner");
  $("schema-help").textContent = (schema.title || k.address) + " — fields: " + fields.join(", ") +
    (req.length ? " (required: " + req.join(", ") + ")" : "");
  if (fill) { $("input").value = JSON.stringify(example(schema, ""), null, 2); inputError(""); }
}

// Where a parse error is: line and column, and the caret put there.
function jsonError(e, text) {
  const m = /position (\d+)/.exec(e.message);
  if (!m) return "not JSON: " + e.message;
  const pos = Math.min(+m[1], text.length), before = text.slice(0, pos);
  const line = before.split("\n").length, col = pos - before.lastIndexOf("\n");
  $("input").focus(); $("input").setSelectionRange(pos, pos + 1);
  return `not JSON (line ${line}, column ${col}): ${e.message}`;
}
// The field a gateway error names (`at $.field` or `required field `f``), said first.
function fieldOf(message) {
  const m = /at `\$\.([^`]+)`/.exec(message) || /required field `([^`]+)`/.exec(message);
  return m ? "field " + m[1] + ": " : "";
}

function inputError(text) {
  $("input-error").textContent = text;
  $("input").classList.toggle("invalid", !!text);
  $("input").setAttribute("aria-invalid", text ? "true" : "false");
}

$("input").addEventListener("input", () => {
  try { JSON.parse($("input").value); inputError(""); } catch { /* shown on submit */ }
});

$("submit").onclick = async () => {
  const kind = $("kind").value;
  let input;
  try { input = JSON.parse($("input").value || "{}"); } catch (e) { inputError(jsonError(e, $("input").value)); return; }
  if (input === null || typeof input !== "object" || Array.isArray(input)) { inputError("the input must be a JSON object"); return; }
  inputError("");
  $("submit").disabled = true;
  try {
    const r = await api("/v1/jobs", {method: "POST", body: JSON.stringify({kind, input})});
    openJob(r.job_id, kind, true);
  } catch (e) {
    inputError(fieldOf(e.message) + "the gateway refused it (" + e.status + "): " + e.message);
  } finally { $("submit").disabled = false; }
};

$("cancel").onclick = () => {
  if (view && ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "cancel", job_id: view.job_id, id: "cancel"}));
};

// -- the job on screen ----------------------------------------------------------------

function openJob(job_id, kind, fresh) {
  const k = kinds.find((x) => x.kind === kind);
  view = {job_id, kind, address: k ? k.address : kind, status: "pending", events: []};
  save();
  renderView(view);
  followJob(job_id, 0);
  if (kind) api("/v1/console/jobs", {method: "POST", body: JSON.stringify({job_id, kind})})
    .then(() => refreshHistory()).catch(() => {});
  if (fresh) $("job-panel").scrollIntoView({block: "nearest"});
}

// -- history --------------------------------------------------------------------------

$("history-refresh").onclick = () => refreshHistory();
async function refreshHistory() {
  if (!token) return;
  let rows;
  try { rows = await api("/v1/console/jobs"); } catch { return; }
  const tb = $("history"); clear(tb);
  $("history-empty").hidden = rows.length > 0;
  for (const h of rows) {
    tb.append(el("tr", {class: "history-row", "data-job": h.job_id},
      el("td", {}, el("code", {text: short(h.job_id), title: h.job_id})),
      el("td", {text: h.kind}),
      el("td", {}, el("span", {class: "badge " + h.status, text: h.status, title: h.error || ""})),
      el("td", {text: when(h.submitted_at)}),
      el("td", {}, el("button", {class: "secondary open", type: "button", text: "open", onclick: () => openJob(h.job_id, h.kind, true)}))));
  }
}

// Open one of the user's jobs by its id (submitted elsewhere, or gone from the history);
// the server answers 404 for a job that is not the caller's.
$("open-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = $("open-id").value.trim();
  $("open-error").textContent = "";
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(id)) { $("open-error").textContent = "not a job id (1 to 128 of A-Z a-z 0-9 _ -)"; return; }
  try {
    const j = await api(`/v1/console/jobs/${encodeURIComponent(id)}`);
    $("open-id").value = "";
    openJob(j.job_id, j.kind, true);
  } catch (e) {
    $("open-error").textContent = e.status === 404 ? `no job ${id} of yours` : "could not open it: " + e.message;
  }
});

// -- dead letters (admins) ------------------------------------------------------------

$("dlq-refresh").onclick = () => refreshDeadLetters();
async function refreshDeadLetters() {
  let rows;
  try { rows = await api("/v1/admin/dead-letters"); } catch (e) { $("dlq-status").textContent = e.message; return; }
  const tb = $("dlq"); clear(tb);
  $("dlq-empty").hidden = rows.length > 0;
  for (const d of rows) {
    const reason = (d.reason.type ? d.reason.type + ": " : "") + (d.reason.message || "");
    tb.append(el("tr", {class: "dlq-row", "data-job": d.job_id},
      el("td", {}, el("code", {text: short(d.job_id), title: d.job_id})),
      el("td", {text: d.kind}), el("td", {text: String(d.attempts)}),
      el("td", {class: "reason", text: reason}),
      el("td", {class: "preview", text: d.input_preview}),
      el("td", {}, el("button", {class: "secondary replay", type: "button", text: "replay", onclick: () => replay(d.job_id)}))));
  }
}
async function replay(job_id) {
  try {
    const r = await api(`/v1/admin/dead-letters/${encodeURIComponent(job_id)}/replay`, {method: "POST"});
    $("dlq-status").textContent = "replayed " + r.replayed.join(", ");
  } catch (e) { $("dlq-status").textContent = "replay failed: " + e.message; }
  refreshDeadLetters();
}

// -- pods and figures -----------------------------------------------------------------

$("refresh").onclick = () => refreshPods();
async function refreshPods() {
  try {
    const [pods, fig] = await Promise.all([api("/v1/pods"), api("/v1/console/figures")]);
    const byName = new Map();
    for (const p of pods) { if (!byName.has(p.pod)) byName.set(p.pod, []); byName.get(p.pod).push(p); }
    const tb = $("pods"); clear(tb);
    for (const [name, reps] of byName) {
      const ready = reps.filter((p) => p.ready).length;
      const notes = [...new Set(reps.flatMap((p) => [...(p.reasons || []), ...(p.degraded || []).map((d) => "degraded: " + d)]))];
      const plugins = [...new Set(reps.flatMap((p) => p.plugins || []))];
      const tr = el("tr", {class: "pod", "data-pod": name},
        el("td", {text: name}), el("td", {class: "replicas", text: String(reps.length)}),
        el("td", {class: "ready " + (ready === reps.length ? "ok" : "bad"), text: ready === reps.length ? "ready" : `${ready}/${reps.length} ready`}),
        el("td", {text: plugins.join(", ")}), el("td", {class: "notes", text: notes.join("; ")}));
      tb.append(tr);
    }
    const figs = $("figures"); clear(figs);
    const jobs = fig.jobs || {};
    const depth = Object.values(fig.queue_depth || {}).reduce((a, b) => a + b, 0);
    for (const [key, v, label] of [["ws_connections", fig.ws_connections, "open sockets"], ["jobs_done", jobs.done || 0, "jobs done"],
      ["jobs_failed", jobs.failed || 0, "jobs failed"], ["dead_letters", fig.dead_letters, "dead letters"],
      ["queued", depth, "jobs waiting or running"], ["memory", fig.resident_memory_mb + " MB", "gateway pod memory"]]) {
      figs.append(el("div", {class: "figure", "data-figure": key}, el("b", {text: String(v)}), el("span", {text: label})));
    }
    $("pods-error").textContent = "";
  } catch (e) { $("pods-error").textContent = "pods: " + e.message; }
}

refreshPods();
setInterval(refreshPods, 5000);
if (token) start(); else $("auth").hidden = false;
