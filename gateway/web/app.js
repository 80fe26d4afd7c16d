// The gateway's page: the cluster from /v1/cluster (refreshed every REFRESH_MS), the join command, and
// a chat streamed from /v1/chat/completions (fetch + server-sent events). No framework, no build step.
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
let servedModel = null;

// ------------------------------------------------------------------------------------------ cluster
async function refresh() {
  try {
    const response = await fetch("/v1/cluster", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    showCluster(await response.json());
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("updated").textContent = `cannot read the cluster: ${err.message}`;
  }
}

function showCluster(status) {
  servedModel = status.served_model;
  $("model").textContent = servedModel;
  const coverage = status.models[servedModel];
  const complete = coverage && coverage.complete;
  $("coverage").textContent = complete ? `${coverage.pipelines} complete pipeline(s)`
    : coverage && coverage.missing.length ? `missing layers ${coverage.missing.map((r) => r.join(":")).join(", ")}`
    : "no stages";
  $("coverage").className = `pill ${complete ? "ok" : "bad"}`;
  const models = $("models");
  models.replaceChildren(...Object.entries(status.models).map(([name, m]) =>
    modelView(name, m, status.nodes.filter((n) => n.kind === "stage" && n.model === name))));
  const others = status.nodes.filter((n) => n.kind !== "stage");
  $("others").replaceChildren(...others.map((n) => {
    const line = el("div", "", `${n.kind} ${n.node_id}` + (n.kind === "gateway" ? ` (${n.load.running} requests)` : "")
      + (status.leader === n.node_id ? " (leader)" : ""));
    line.append(healthBadge(n));
    return line;
  }));
  const ghosts = status.nodes.filter((n) => n.health === "stale");
  $("ghosts").hidden = !ghosts.length;
  $("ghosts").textContent = ghosts.length ? `Ghosts (no heartbeat): ${ghosts.map((n) => `${n.node_id} (${Math.round(n.age_s)} s)`).join(", ")}`
    + ` - remove one with: parallax evict NODE` : "";
  $("join").textContent = status.join;
}

function modelView(name, m, stages) {
  const box = el("div", "model");
  box.dataset.model = name;
  box.append(el("div", "", `${name}: ${m.num_layers} layers`));
  const layers = Math.max(1, m.num_layers);
  const ruler = el("div", "ruler");
  const step = Math.max(1, Math.ceil(layers / 12));
  for (let l = 0; l <= layers; l += step) {
    const tick = el("span", "", String(l));
    tick.style.left = `${(100 * l) / layers}%`;
    ruler.append(tick);
  }
  box.append(ruler);
  for (const n of stages) box.append(stageView(n, layers));
  return box;
}

function stageView(n, layers) {
  const row = el("div", "stage");
  row.dataset.node = n.node_id;
  const info = el("div", "info");
  const title = el("b", "", n.node_id);
  title.append(healthBadge(n));
  const device = n.backend && n.backend !== "torch" ? `${n.backend}:${n.device}` : n.device;
  const load = n.load || {};
  const kv = load.kv_blocks_total ? load.kv_blocks_used / load.kv_blocks_total : 0;
  const state = n.state === "loading" && n.progress != null ? `loading ${Math.round(100 * n.progress)}%` : n.state;
  info.append(title, el("span", "", `${device} ${n.dtype} - ${state} - ${load.running || 0} running, `
    + `${load.waiting || 0} waiting, KV ${Math.round(100 * kv)}%`));
  const bar = el("div", "load");
  const fill = el("div");
  fill.style.width = `${Math.round(100 * kv)}%`;
  bar.append(fill);
  info.append(bar);
  const lane = el("div", "lane");
  lane.style.setProperty("--w", `${100 / layers}%`);
  if (n.start !== null && n.start !== undefined) {
    const range = el("div", `range ${n.health === "stale" ? "ghost" : n.state}`, `${n.start}:${n.end}`);
    range.dataset.range = `${n.start}:${n.end}`;
    range.style.left = `${(100 * n.start) / layers}%`;
    range.style.width = `${(100 * (n.end - n.start)) / layers}%`;
    lane.append(range);
  }
  row.append(info, lane);
  return row;
}

function healthBadge(n) {
  const ghost = n.health === "stale";
  return el("span", `badge ${ghost ? "ghost" : "ok"}`, ghost ? "ghost" : "ok");
}

$("copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("join").textContent));

// --------------------------------------------------------------------------------------------- chat
const history = [];

function bubble(role, text) {
  const b = el("div", `msg ${role}`);
  if (role === "user") b.textContent = text;
  $("messages").append(b);
  $("messages").scrollTop = $("messages").scrollHeight;
  return b;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("send").disabled) return;
  $("prompt").value = "";
  $("send").disabled = true;
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant");
  answer.dataset.chunks = "0";
  let raw = "";
  try {
    const body = { model: servedModel, messages: history, stream: true,
                   max_tokens: Number($("max-tokens").value) || 256, temperature: Number($("temperature").value) };
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
                                                           body: JSON.stringify(body) });
    if (!response.ok) throw new Error(((await response.json()).error || {}).message || `HTTP ${response.status}`);
    for await (const event of sse(response)) {
      if (event.error) throw new Error(event.error.message);
      const delta = (event.choices[0] || {}).delta || {};
      if (delta.content) {
        raw += delta.content;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.dataset.raw = raw;
        answer.innerHTML = md.render(raw);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: raw });
  } catch (err) {
    answer.classList.add("error");
    answer.textContent = `${raw ? raw + "\n" : ""}error: ${err.message}`;
    history.pop();
  } finally {
    answer.dataset.done = "1";
    $("send").disabled = false;
  }
}

// The JSON events of a server-sent event stream, until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"));
      buffer = buffer.slice(cut + 2);
      const data = lines.map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

$("chat").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });

refresh();
setInterval(refresh, REFRESH_MS);
