// The job on screen: one readable line per event and, for helios jobs, a card per expert
// (status, confidence, latency, tokens, its text as it streams) and the synthesis as text.
// `view` is {job_id, kind, address, status, events}; renderView draws it from scratch,
// renderFrame adds one event or result frame.

import {$, clear, el} from "./dom.js";

let experts = {};   // expert name -> {card parts, text, attempt}
const ENDED = ["answered", "failed", "timed out", "cancelled", "skipped"];
let synthesis = "";

export function renderView(view) {
  $("job-panel").hidden = !view;
  if (!view) return;
  $("job-id").textContent = view.job_id;
  $("job-kind").textContent = view.kind;
  setStatus(view.status || "pending");
  const helios = isHelios(view);
  $("helios-view").hidden = !helios;
  $("result-view").hidden = true;
  clear($("events")); clear($("experts"));
  $("synthesis").textContent = ""; $("synthesis-meta").textContent = ""; $("perceived").textContent = "";
  $("event-count").textContent = "0";
  experts = {}; synthesis = "";
  for (const f of view.events) renderFrame(view, f, false);
}
// Helios jobs get expert cards and the synthesis as text; other kinds their result.
function isHelios(view) { return (view.address || view.kind || "").startsWith("helios."); }
function setStatus(s) {
  const b = $("job-status"); b.textContent = s; b.className = "badge " + s;
  $("cancel").hidden = s === "done" || s === "failed" || s === "cancelled";
}

export function renderFrame(view, f, live) {
  const type = f.type === "result" ? "job." + f.status : f.event;
  const data = f.type === "result" ? (f.status === "done" ? f.result : f.error) : f.data;
  const row = el("li", {"data-seq": String(f.seq), class: "event"},
    el("span", {class: "seq", text: "#" + f.seq}), el("span", {class: "type", text: type}),
    el("span", {class: "summary", text: summary(type, data)}));
  $("events").append(row);
  $("event-count").textContent = String($("events").children.length);
  if (live) $("events").scrollTop = $("events").scrollHeight;
  if (f.type === "result") setStatus(f.status); else setStatus("running");
  if (isHelios(view)) heliosEvent(type, data || {});
  else if (f.type === "result") {
    $("result-view").hidden = false;
    $("result-view").textContent = f.status === "done" ? readable(data) : "failed: " + summary(type, data);
  }
}

// One line a person can read: `key: value` pairs, long text cut short.
function summary(type, data) {
  if (data === null || data === undefined) return "";
  if (typeof data !== "object") return String(data);
  const parts = [];
  for (const [k, v] of Object.entries(data)) {
    if (k === "owner" || (k === "type" && v === type)) continue;  // the tag repeats the event's type
    let s = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
    if (s.length > 140) s = s.slice(0, 139) + "…";
    parts.push(k + ": " + s);
  }
  return parts.join(" · ");
}
function readable(data) {
  if (data && typeof data === "object") {
    return Object.entries(data).map(([k, v]) => k + ": " + (typeof v === "object" ? JSON.stringify(v, null, 2) : v)).join("\n");
  }
  return String(data);
}

function card(name) {
  if (experts[name]) return experts[name];
  const status = el("span", {class: "badge started", text: "started"});
  const meta = el("div", {class: "meta"});
  const text = el("div", {class: "text"});
  const c = el("div", {class: "card expert", "data-expert": name}, el("h4", {}, el("span", {text: name}), status), meta, text);
  $("experts").append(c);
  return experts[name] = {c, status, meta, text, attempt: 0, streamed: ""};
}
function cardStatus(x, s, metaText) {
  x.status.textContent = s; x.status.className = "badge " + s.replace(" ", "-");
  x.c.dataset.status = s;
  if (metaText !== undefined) x.meta.textContent = metaText;
}

function heliosEvent(type, d) {
  switch (type) {
    case "helios.perceived": $("perceived").textContent = "intent: " + d.intent; break;
    case "helios.selected":
      for (const name of d.experts || []) cardStatus(card(name), "selected", "");
      break;
    case "helios.expert_started":
      cardStatus(card(d.expert), "started", "budget " + (+d.budget_s).toFixed(1) + " s" + (d.tokens_reserved ? " · " + d.tokens_reserved + " tokens reserved" : ""));
      break;
    case "reasoning.answer_streamed": {
      const x = card(d.label || d.role);
      // a new attempt, or a stream starting again at index 0 (the call was sent again to another
      // replica after its pod was lost), voids what came before
      if (d.attempt !== x.attempt || d.index === 0) { x.attempt = d.attempt; x.streamed = ""; }
      x.streamed += d.text; x.text.textContent = x.streamed;
      if (!ENDED.includes(x.c.dataset.status)) cardStatus(x, "streaming");  // a late chunk never reopens a card
      break;
    }
    case "helios.expert_answered": {
      const x = card(d.expert);
      cardStatus(x, "answered", "confidence " + (+d.confidence).toFixed(2) + " · " + Math.round(d.latency_ms) + " ms" +
        (d.tokens ? " · " + d.tokens + " tokens" : "") + (d.cached ? " · cached" : ""));
      x.text.textContent = d.answer;
      break;
    }
    case "helios.expert_failed": cardStatus(card(d.expert), "failed", d.reason); break;
    case "helios.expert_timed_out": cardStatus(card(d.expert), "timed out", "no answer within " + d.budget_s + " s"); break;
    case "helios.expert_cancelled": cardStatus(card(d.expert), "cancelled", d.reason); break;
    case "helios.expert_skipped": cardStatus(card(d.expert), "skipped", d.reason); break;
    case "helios.synthesis_delta": synthesis += d.text; $("synthesis").textContent = synthesis; break;
    case "job.done":
      if (d.answer && !synthesis) $("synthesis").textContent = d.answer;
      $("synthesis-meta").textContent = "confidence " + (+d.confidence || 0).toFixed(2) +
        (d.elapsed_ms ? " · " + Math.round(d.elapsed_ms) + " ms" : "") + (d.tokens_spent ? " · " + d.tokens_spent + " tokens" : "");
      for (const e of d.experts || []) {
        const x = card(e.expert);
        if (!x.c.dataset.status || ["started", "selected", "streaming"].includes(x.c.dataset.status)) {
          cardStatus(x, e.status.replace("_", " "), (e.error || "") + (e.latency_ms ? " " + Math.round(e.latency_ms) + " ms" : ""));
        }
      }
      break;
    case "job.failed": case "job.cancelled": {
      const outcome = type.slice(4);
      $("synthesis-meta").textContent = outcome + ": " + (d.message || d.type || "");
      // Experts still at work when the job ended have no outcome of their own: they end with it.
      for (const x of Object.values(experts)) {
        if (["started", "selected", "streaming"].includes(x.c.dataset.status)) cardStatus(x, outcome, "ended with the job");
      }
      break;
    }
  }
}
