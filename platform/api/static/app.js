// Torpor dashboard: renders the API's live feed (/v1/ui/stream); actions go through the
// same API routes as the CLI. No dependencies, no build step. Text from the platform is
// only ever set with textContent.
"use strict";

const HISTORY = 60;           // points per sparkline (one a second)
const history = new Map();    // function -> {inflight: [], rps: [], p95: []}
const cards = new Map();      // function -> card element
let lastState = null;

function $(sel, root) { return (root || document).querySelector(sel); }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function push(name, key, value) {
  let h = history.get(name);
  if (!h) { h = {inflight: [], rps: [], p95: []}; history.set(name, h); }
  h[key].push(Number.isFinite(value) ? value : 0);
  if (h[key].length > HISTORY) h[key].shift();
  return h[key];
}

function spark(svg, values) {
  const max = Math.max(1e-9, ...values);
  const step = 120 / (HISTORY - 1);
  const off = HISTORY - values.length;
  const pts = values.map((v, i) => `${((off + i) * step).toFixed(1)},${(29 - (v / max) * 27).toFixed(1)}`);
  svg.querySelector("polyline").setAttribute("points", pts.join(" "));
  svg.dataset.max = String(max);
  svg.dataset.last = String(values.length ? values[values.length - 1] : 0);
}

async function act(name, action, card) {
  const msg = $(".ro-msg", card);
  msg.textContent = `${action}…`;
  try {
    const r = await fetch(`/v1/functions/${encodeURIComponent(name)}/rollout/${action}`, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: "{}",
    });
    const body = await r.json().catch(() => ({}));
    msg.textContent = r.ok ? `${action}: done` : `${action}: ${body.detail || body.error || r.status}`;
  } catch (e) {
    msg.textContent = `${action}: ${e}`;
  }
}

function card(name) {
  let c = cards.get(name);
  if (c) return c;
  c = $("#fn-card").content.firstElementChild.cloneNode(true);
  c.dataset.function = name;
  $(".fn-name", c).textContent = name;
  for (const b of c.querySelectorAll(".ro-actions button")) {
    b.addEventListener("click", () => act(name, b.dataset.action, c));
  }
  cards.set(name, c);
  $("#functions").appendChild(c);
  return c;
}

function renderFunction(fn) {
  const c = card(fn.name);
  const url = $(".fn-url", c);
  url.textContent = fn.url;
  url.href = fn.url;

  const bar = $(".traffic", c);
  bar.replaceChildren(...fn.traffic.filter(t => t.percent > 0).map(t => {
    const d = el("div", "", `${t.revision}${t.tag ? " (" + t.tag + ")" : ""} ${t.percent}%`);
    d.style.width = `${t.percent}%`;
    d.dataset.revision = t.revision;
    d.dataset.percent = String(t.percent);
    return d;
  }));

  const reps = $(".replicas", c);
  const states = Object.entries(fn.replicas);
  reps.replaceChildren(...(states.length ? states.map(([s, n]) => el("span", `badge ${s}`, `${n} ${s}`))
                                       : [el("span", "badge", "scaled to zero")]));

  const st = fn.stats || {};
  spark($(".s-inflight", c), push(fn.name, "inflight", st.in_flight || 0));
  spark($(".s-rps", c), push(fn.name, "rps", st.rps || 0));
  spark($(".s-p95", c), push(fn.name, "p95", st.p95_ms || 0));
  $(".v-inflight", c).textContent = (st.in_flight || 0).toFixed(1);
  $(".v-rps", c).textContent = (st.rps || 0).toFixed(1);
  $(".v-p95", c).textContent = st.p95_ms == null ? "–" : `${st.p95_ms.toFixed(0)} ms`;

  const ro = fn.rollout;
  const box = $(".rollout", c);
  box.hidden = !ro;
  if (ro) {
    const i = Math.min(ro.step, ro.steps.length - 1);
    const pct = ro.state === "promoted" ? 100 : (ro.state === "running" || ro.state === "paused") ? ro.steps[i] : 0;
    $(".ro-line", c).textContent =
      `rollout ${ro.stable} → ${ro.to}: ${ro.state}` +
      (ro.state === "running" || ro.state === "paused" ? `, step ${ro.step + 1}/${ro.steps.length} (${ro.steps[i]}%)` : "") +
      (ro.reason ? ` — ${ro.reason}` : "");
    $(".ro-fill", c).style.width = `${pct}%`;
    box.dataset.state = ro.state;
    const active = ro.state === "running" || ro.state === "paused";
    for (const b of box.querySelectorAll("button")) {
      const a = b.dataset.action;
      b.disabled = !active || (a === "pause" && ro.state !== "running") || (a === "resume" && ro.state !== "paused");
    }
  }

  const tbody = $(".revs tbody", c);
  tbody.replaceChildren(...fn.revisions.slice().reverse().map(r => {
    const tr = el("tr");
    tr.append(el("td", "", r.name), el("td", `st-${r.status}`, r.status), el("td", "", `${r.traffic}%`),
              el("td", "", String(r.replicas)));
    return tr;
  }));
}

function render(state) {
  lastState = state;
  const names = new Set(state.functions.map(f => f.name));
  for (const [name, c] of cards) {
    if (!names.has(name)) { c.remove(); cards.delete(name); history.delete(name); }
  }
  $("#nofn").hidden = names.size > 0;
  const more = state.functions_not_shown || 0;
  $("#more").hidden = more === 0;
  $("#more").textContent = `${more} more functions not shown (the first ${state.functions.length} by name are)`;
  state.functions.forEach(renderFunction);
  const list = $("#events");
  list.replaceChildren(...state.events.slice().reverse().map(e => {
    const li = el("li");
    const t = new Date(e.time * 1000);
    li.append(el("span", "t", t.toLocaleTimeString([], {hour12: false})), el("span", "k", e.kind),
              document.createTextNode(`${e.function}: ${e.message}`));
    return li;
  }));
  $("#clock").textContent = new Date(state.time * 1000).toLocaleTimeString([], {hour12: false});
}

async function start() {
  const conn = $("#conn");
  const probe = await fetch("/v1/functions", {credentials: "same-origin"}).catch(() => null);
  if (probe && probe.status === 401) {
    conn.textContent = "not signed in: run `torpor ui`";
    return;
  }
  const es = new EventSource("/v1/ui/stream");
  es.addEventListener("state", ev => {
    conn.textContent = "live";
    conn.classList.remove("off");
    render(JSON.parse(ev.data));
  });
  es.addEventListener("full", ev => { conn.textContent = ev.data; conn.classList.add("off"); });
  es.onerror = () => { conn.textContent = "reconnecting…"; conn.classList.add("off"); };
}

window.torporState = () => lastState;
start();
