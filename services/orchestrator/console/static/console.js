// Baton run console: plain JavaScript, no dependencies, no build step.
// Everything comes from the orchestrator's own API (/v1/...) and the
// console's routes (/ui/...), authenticated by the session cookie; live
// updates arrive by server-sent events. DOM is built with textContent only.

const app = document.getElementById("app");
const state = { session: null, streams: [] };
const PHASE_NAMES = {
  queue: "queue wait", context: "context fetch", admission: "KV admission", prefill: "prefill / TTFT",
  decode: "decode", tool: "tool calls", record: "recording", run: "step (not itemised)",
};
const LAYERS = ["orchestration", "inference", "context", "tool"];

// -- helpers ------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session && state.session.csrf) headers["X-Baton-CSRF"] = state.session.csrf;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin" });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error((doc.error && doc.error.message) || `HTTP ${r.status}`);
    err.status = r.status;
    err.code = doc.error && doc.error.code;
    throw err;
  }
  return doc;
}

function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : "";
}

function closeStreams() {
  for (const es of state.streams) es.close();
  state.streams = [];
  if (state.ticker) clearInterval(state.ticker);
  state.ticker = null;
  clearTimeout(task.pending);
}

function listen(url, handlers) {
  const es = new EventSource(url, { withCredentials: true });
  for (const [ev, fn] of Object.entries(handlers)) es.addEventListener(ev, (m) => fn(JSON.parse(m.data), es));
  state.streams.push(es);
  return es;
}

const fmt = {
  tokens: (u) => ((u.prompt_tokens || 0) + (u.completion_tokens || 0)).toLocaleString(),
  gpu: (s) => `${(s || 0).toFixed(3)} s`,
  cost: (c) => `$${(c || 0).toFixed(6)}`,
  age: (t) => {
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return `${s.toFixed(0)} s`;
    if (s < 3600) return `${(s / 60).toFixed(0)} min`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  },
  secs: (s) => (s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`),
};

function interactive() {
  if (!document.body.dataset.ready) {
    document.body.dataset.ready = "1";
    performance.mark("baton-interactive");
  }
}

// -- login ----------------------------------------------------------------------

function renderLogin() {
  const why = new URLSearchParams(location.search).get("login");
  const notes = {
    refused: "That key is not one of this orchestrator's API keys.",
    expired: "That login link has expired or is not valid: ask for a new one (baton console).",
    used: "That login link was used already: ask for a new one (baton console).",
    suspended: "This tenant is suspended: ask the operator to resume it.",
  };
  app.replaceChildren(h("section", { class: "login" },
    h("h1", {}, "Log in to the run console"),
    why && notes[why] ? h("p", { class: "notice bad", id: "login-error" }, notes[why]) : null,
    h("form", { method: "post", action: "/ui/login" },
      h("label", { for: "key" }, "API key (a tenant's, or the operator's)"),
      h("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true }),
      h("button", { class: "primary", type: "submit" }, "Log in")),
    h("p", { class: "muted" }, "Or open a one-time login link: ", h("code", {}, "baton console --tenant <tenant>"), ".")));
  interactive();
}

// -- the task list ----------------------------------------------------------------

const list = { filters: { status: "", workflow: "", tenant: "" }, cursors: [], rows: new Map() };

async function renderList(params) {
  closeStreams();
  task.id = null;
  const f = list.filters;
  const operator = state.session.scope === "*";
  const cursor = params.get("cursor") || "";
  const workflows = await api("/v1/workflows").catch(() => ({ workflows: [] }));
  const select = (name, options) => h("select", { name, onchange: (e) => { f[name] = e.target.value; location.hash = "#/"; route(); } },
    options.map(([v, label]) => h("option", { value: v, selected: f[name] === v }, label)));
  const filters = h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
    h("label", {}, "status", select("status", [["", "any"], ["running", "running"], ["completed", "completed"], ["failed", "failed"], ["cancelled", "cancelled"]])),
    h("label", {}, "workflow", select("workflow", [["", "any"], ...workflows.workflows.map((w) => [w.name, w.name])])),
    operator ? h("label", {}, "tenant", select("tenant", [["", "every tenant"], ...state.session.tenants.map((t) => [t, t])])) : null);
  const body = h("tbody", { id: "tasks" });
  const table = h("table", {},
    h("thead", {}, h("tr", {}, ["task", "tenant", "workflow", "status", "age"].map((c) => h("th", {}, c)),
      ["tokens", "GPU-s", "cost"].map((c) => h("th", { class: "num" }, c)))),
    body);
  const page = await api(`/v1/tasks${qs({ ...f, limit: 25, cursor })}`);
  list.rows = new Map();
  for (const t of page.tasks) body.append(taskRow(t));
  const pager = h("div", { class: "pager" },
    cursor ? h("a", { href: "#/" }, "← newest") : h("span", { class: "muted", id: "live" }, "live"),
    page.next_cursor ? h("a", { href: `#/?cursor=${encodeURIComponent(page.next_cursor)}`, id: "older" }, "older →") : null,
    h("span", { class: "muted", id: "count" }, `${page.tasks.length} shown`));
  app.replaceChildren(h("h2", {}, "Tasks"), filters, table,
    page.tasks.length ? null : h("p", { class: "muted", id: "empty" }, "No tasks yet."), pager);
  if (!cursor) {  // the first page follows changes live
    listen(`/ui/api/feed${qs({ tenant: f.tenant })}`, {
      task: (t) => {
        if ((f.status && t.status !== f.status) || (f.workflow && t.workflow !== f.workflow)) return;
        const old = list.rows.get(`${t.tenant}/${t.task_id}`);
        const row = taskRow(t);
        if (old && old.isConnected) old.replaceWith(row); else body.prepend(row);
        const empty = document.getElementById("empty");
        if (empty) empty.remove();
        document.getElementById("count").textContent = `${body.children.length} shown`;
      },
    });
  }
  state.ticker = setInterval(() => {
    for (const cell of document.querySelectorAll("td[data-created]")) cell.textContent = fmt.age(Number(cell.dataset.created));
  }, 1000);
  interactive();
}

function taskRow(t) {
  const href = `#/t/${encodeURIComponent(t.tenant)}/${encodeURIComponent(t.task_id)}`;
  const row = h("tr", { class: "task", "data-task": t.task_id, onclick: () => { location.hash = href; } },
    h("td", { class: "mono" }, h("a", { href }, t.task_id), t.forked_from ? h("span", { class: "badge" }, "fork") : null),
    h("td", {}, t.tenant), h("td", {}, t.workflow),
    h("td", { class: `status ${t.status}` }, t.status, t.error ? h("span", { class: "badge bad" }, t.error.layer) : null),
    h("td", { "data-created": t.created_at }, fmt.age(t.created_at)),
    h("td", { class: "num" }, fmt.tokens(t.usage)), h("td", { class: "num" }, (t.usage.gpu_seconds || 0).toFixed(3)),
    h("td", { class: "num" }, fmt.cost(t.cost_usd)));
  list.rows.set(`${t.tenant}/${t.task_id}`, row);
  return row;
}

// -- one task ------------------------------------------------------------------------

const task = { id: null, view: null, open: null, text: new Map(), pending: null };

async function renderTask(tenant, taskId) {
  closeStreams();
  task.id = taskId; // a late answer about the task shown before is dropped, not drawn
  task.open = null;
  task.text = new Map();
  const base = `/v1/tasks/${encodeURIComponent(taskId)}`;
  const t = qs({ tenant });
  try {
    const view = await api(`/ui/api/tasks/${encodeURIComponent(taskId)}${t}`);
    if (task.id !== taskId) return;
    task.view = view;
  } catch (e) {
    if (task.id !== taskId) return;
    app.replaceChildren(h("p", { class: "notice bad", id: "task-error" }, `${e.code || "error"}: ${e.message}`), h("a", { href: "#/" }, "← tasks"));
    interactive();
    return;
  }
  drawTask();
  interactive();
  const refresh = () => {
    clearTimeout(task.pending);
    task.pending = setTimeout(async () => {
      const view = await api(`/ui/api/tasks/${encodeURIComponent(taskId)}${t}`).catch(() => null);
      if (task.id !== taskId || !view) return;
      task.view = view;
      drawTask();
    }, 150);
  };
  if (task.view.status === "running") {
    listen(`${base}/events${t}`, {
      step: refresh, accepted: refresh,
      completed: (_, es) => { es.close(); refresh(); }, failed: (_, es) => { es.close(); refresh(); },
    });
  }
  listen(`${base}/tokens${t}`, {
    token: (d) => {
      let s = task.text.get(d.step);
      if (!s || s.attempt !== d.attempt) { s = { attempt: d.attempt, agent: d.agent, text: "" }; task.text.set(d.step, s); }
      s.text += d.text;
      const pre = document.querySelector(`pre[data-stream="${CSS.escape(d.step)}"]`);
      if (pre && pre.dataset.attempt === d.attempt) pre.append(d.text); else drawStreams();
    },
    end: (_, es) => es.close(),
  });
  state.ticker = setInterval(() => { if (task.view && task.view.status === "running") refresh(); }, 2000);
}

function drawTask() {
  const v = task.view;
  const act = (path, body) => api(`/v1/tasks/${encodeURIComponent(v.task_id)}${path}${qs({ tenant: v.tenant })}`, { method: "POST", body });
  const head = h("div", { class: "taskhead" },
    h("a", { href: "#/" }, "← tasks"),
    h("h1", { class: "mono" }, v.task_id),
    h("span", { class: `status ${v.status}`, id: "task-status" }, v.status),
    v.status === "running" ? h("button", { class: "danger", id: "cancel", onclick: async (e) => {
      e.target.disabled = true;
      await act("/cancel", {}).catch((err) => alert(err.message));
    } }, "Cancel task") : null);
  const kv = h("div", { class: "kv" },
    h("span", {}, "workflow ", h("b", {}, v.workflow)), h("span", {}, "tenant ", h("b", {}, v.tenant)),
    h("span", {}, "session ", h("b", { class: "mono" }, v.session)),
    h("span", {}, "tokens ", h("b", {}, fmt.tokens(v.usage))), h("span", {}, "GPU ", h("b", {}, fmt.gpu(v.usage.gpu_seconds))),
    h("span", {}, "cost ", h("b", {}, fmt.cost(v.cost_usd))),
    v.forked_from ? h("span", {}, "forked from ", h("a", { href: `#/t/${v.tenant}/${v.forked_from}` }, v.forked_from), ` at ${v.forked_at}`) : null);
  const parts = [head, kv];
  if (v.failed_layer) {
    const why = v.error ? `${v.error.code}: ${v.error.message}` : "a tool call failed (the run went on)";
    parts.push(h("div", { id: "failure", "data-layer": v.failed_layer },
      h("div", { class: "layer" }, `Failed in the ${v.failed_layer} layer`), h("div", {}, why),
      h("div", { class: "layers" }, LAYERS.map((l) => h("span", { class: l === v.failed_layer ? "hit" : "" }, l)))));
  }
  if (v.waiting) {
    const box = h("textarea", { id: "answer", placeholder: "Your answer" });
    parts.push(h("div", { class: "answer" }, h("b", {}, `${v.waiting.step} waits for your input: `), v.waiting.prompt || "",
      box, h("button", { class: "primary", id: "answer-send", onclick: async (e) => {
        e.target.disabled = true;
        await act("/input", { answer: box.value, step: v.waiting.step }).catch((err) => alert(err.message));
      } }, "Send answer")));
  }
  if (v.graph) parts.push(h("h2", {}, `Workflow — rounds ${v.graph.rounds} of ${v.graph.max_rounds}`), drawGraph(v));
  parts.push(h("h2", {}, "Waterfall"), drawLegend(v), drawWaterfall(v));
  parts.push(h("div", { id: "detail-slot" }));
  parts.push(h("h2", {}, "Token streams"), h("div", { class: "streams", id: "streams" }));
  if (v.output) parts.push(h("h2", {}, "Output"), h("div", { class: "output", id: "output" }, v.output));
  const kept = keepWhatIsOpen();
  app.replaceChildren(...parts);
  if (kept.streams) document.getElementById("streams").replaceWith(kept.streams);
  drawStreams();
  if (task.open) openStep(task.open);
  kept.restore();
}

// A redraw (every step event, every 2 s while running) must not take away
// what a person is doing: text typed but not sent (the answer, a fork's
// input), the caret, a context window opened, the stream boxes (their scroll).
function keepWhatIsOpen() {
  const key = (el) => `${el.closest("[data-step]")?.dataset.step || ""}|${el.id || el.className}`;
  const typed = [...app.querySelectorAll("textarea, input")].filter((el) => el.value)
    .map((el) => ({ key: key(el), value: el.value, focused: document.activeElement === el, start: el.selectionStart, end: el.selectionEnd }));
  const context = document.getElementById("context");
  const shown = context && context.childNodes.length ? { step: task.open, nodes: [...context.childNodes] } : null;
  const streams = document.getElementById("streams");
  return {
    streams,
    restore() {
      const fresh = new Map([...app.querySelectorAll("textarea, input")].map((el) => [key(el), el]));
      for (const t of typed) {
        const el = fresh.get(t.key);
        if (!el || el.value) continue;
        el.value = t.value;
        if (t.focused) { el.focus(); el.setSelectionRange(t.start, t.end); }
      }
      const box = document.getElementById("context");
      if (shown && box && task.open === shown.step) box.replaceChildren(...shown.nodes);
    },
  };
}

function drawGraph(v) {
  const g = h("div", { class: "graph", id: "graph" });
  v.graph.nodes.forEach((n, i) => {
    const failed = n.runs.some((r) => r.status === "failed");
    const cls = `node ${failed ? "failed" : n.runs.length ? "taken" : "untaken"}`;
    const backs = v.graph.edges.filter((e) => e.from === n.id && e.back);
    g.append(h("div", { class: cls, "data-node": n.id },
      h("div", { class: "id" }, n.id), h("div", { class: "muted" }, n.kind === "parallel" ? `parallel: ${n.agents.join(" + ")}` : n.kind === "input" ? "human input" : n.agents[0]),
      h("div", { class: "runs" }, n.runs.map((r) => h("span", { title: r.status }, `${r.id.split(".")[0]}${r.id.split(".")[2] ? "." + r.id.split(".")[2] : ""} ${r.status === "done" ? "✓" : r.status === "failed" ? "✗" : "…"}`))),
      backs.map((e) => h("div", { class: "back" }, `${e.label} ↩ ${e.to}`))));
    if (i < v.graph.nodes.length - 1) g.append(h("span", { class: "arrow" }, "→"));
  });
  return g;
}

function drawLegend(v) {
  const used = new Set(v.steps.flatMap((s) => s.phases.map((p) => p.name)));
  return h("div", { class: "legend" }, [...v.phases, "run"].filter((p) => used.has(p)).map((p) => h("span", {}, h("i", { class: `bar ${p}`, style: { position: "static", display: "inline-block" } }), PHASE_NAMES[p])),
    h("span", {}, `span ${fmt.secs(v.span || 0)}`));
}

function drawWaterfall(v) {
  const span = Math.max(v.span, 0.001);
  const pct = (x) => `${Math.max(0, Math.min(100, (x / span) * 100))}%`;
  const box = h("div", { class: "wf", id: "waterfall" });
  for (const agent of v.agents) {
    box.append(h("div", { class: "lane" }, agent));
    for (const s of v.steps.filter((x) => x.agent === agent)) {
      const track = h("div", { class: "track" });
      for (const p of s.phases) {
        track.append(h("div", { class: `bar ${s.failed && p.name === "run" ? "failedbar" : p.name}`, title: `${PHASE_NAMES[p.name]}: ${fmt.secs(p.seconds)}`,
          style: { left: pct(s.start + p.start), width: pct(p.seconds) } }));
      }
      if (s.carried) track.append(h("span", { class: "muted carried-note" }, `ran in ${v.forked_from}: not run again`));
      const label = h("div", { class: "label" }, h("span", { class: "mono" }, s.id),
        s.running ? h("span", { class: "badge live" }, "running") : null,
        s.carried ? h("span", { class: "badge", title: "carried over from the task it was forked from" }, "carried") : null,
        s.failed ? h("span", { class: "badge bad", "data-failed-layer": s.layer }, s.layer || "failed") : null);
      const nums = h("div", { class: "nums" }, s.input ? `answered by ${s.answered_by || "…"}` :
        `${(s.prompt_tokens + s.completion_tokens).toLocaleString()} tok · ${s.gpu_seconds.toFixed(3)} GPU-s · ${fmt.cost(s.cost_usd)}`);
      box.append(h("div", { class: `row${s.failed ? " failed" : ""}${s.carried ? " carried" : ""}`, "data-step": s.id, "data-agent": s.agent,
        onclick: () => openStep(s.id) }, label, track, nums));
      for (const c of s.calls) {
        const ct = h("div", { class: "track" }, h("div", { class: `bar ${c.layer ? "failedbar" : "tool"}`, title: `${c.tool}: ${fmt.secs(c.seconds)}`, style: { left: pct(c.start), width: pct(c.seconds) } }));
        box.append(h("div", { class: "row call", "data-call": `${s.id}.${c.key}` },
          h("div", { class: "label" }, `  ↳ ${c.tool} (${c.key})`, c.layer ? h("span", { class: "badge bad" }, "tool") : null), ct,
          h("div", { class: "nums" }, `${c.outcome || c.status} · ${fmt.secs(c.seconds)}`)));
      }
    }
  }
  return box;
}

function drawStreams() {
  const slot = document.getElementById("streams");
  if (!slot || !task.view) return;
  const order = task.view.steps.map((s) => s.id);
  const ids = [...task.text.keys()].sort((a, b) => order.indexOf(a) - order.indexOf(b));
  const running = new Set(task.view.steps.filter((s) => s.running).map((s) => s.id));
  const boxes = new Map([...slot.querySelectorAll("[data-stream-box]")].map((b) => [b.dataset.streamBox, b]));
  slot.replaceChildren(...ids.map((id) => {  // a box already drawn is kept (its scroll), only its head redrawn
    const s = task.text.get(id);
    const head = h("h3", {}, `${id} · ${s.agent}`, running.has(id) ? h("span", { class: "badge live" }, "live") : null);
    const box = boxes.get(id);
    const pre = box && box.querySelector("pre");
    if (pre && pre.dataset.attempt === s.attempt && pre.textContent === s.text) {
      box.querySelector("h3").replaceWith(head);
      return box;
    }
    return h("div", { class: "stream", "data-stream-box": id }, head, h("pre", { "data-stream": id, "data-attempt": s.attempt }, s.text));
  }));
  if (!ids.length) slot.append(h("p", { class: "muted" }, "No tokens streamed yet."));
}

function openStep(stepId) {
  const v = task.view;
  const s = v.steps.find((x) => x.id === stepId);
  const slot = document.getElementById("detail-slot");
  if (!s || !slot) return;
  task.open = stepId;
  const ctxBox = h("div", { id: "context" });
  const edit = h("textarea", { class: "fork-input", placeholder: "Edited input (optional): from the first step it replaces the task's input; else the step reads it last" });
  const finished = (s.status === "done" || s.status === "failed") && !s.input;
  slot.replaceChildren(h("div", { class: "detail", id: "detail", "data-step": s.id },
    h("b", { class: "mono" }, s.id), ` · ${s.agent} · ${s.status}`, s.worker ? ` · worker ${s.worker}` : "", s.attempt > 1 ? ` · attempt ${s.attempt}` : "",
    s.failed ? h("p", { class: "notice bad" }, `This step failed in the ${s.layer} layer (${s.code}).`) : null,
    h("p", {}, s.phases.map((p) => `${PHASE_NAMES[p.name]} ${fmt.secs(p.seconds)}`).join(" · ")),
    h("p", { class: "muted" }, s.context ? `context: session ${s.context.session} at version ${s.context.version}; prompt ${s.prompt_tokens} tokens` : "no context recorded",
      s.context ? h("button", { class: "show-context", onclick: async () => {
        try {
          const c = await api(`/ui/api/tasks/${encodeURIComponent(v.task_id)}/steps/${encodeURIComponent(s.id)}/context${qs({ tenant: v.tenant })}`);
          ctxBox.replaceChildren(h("p", { class: "muted" }, `${c.messages.length} messages, ${c.tokens} tokens (window), ${c.dropped} older dropped`),
            ...c.messages.map((m) => h("div", { class: "msg" }, h("div", { class: "role" }, m.name ? `${m.role} (${m.name})` : m.role), m.content)));
        } catch (e) { ctxBox.replaceChildren(h("p", { class: "notice bad" }, e.message)); }
      } }, "Show context window") : null),
    ctxBox,
    s.output ? h("pre", {}, s.output) : null,
    finished ? h("div", { class: "fork" }, h("h2", {}, "Fork from this step"), edit,
      h("button", { class: "primary fork-go", onclick: async (e) => {
        e.target.disabled = true;
        try {
          const body = { step: s.id };
          if (edit.value.trim()) body.input = edit.value;
          const got = await api(`/v1/tasks/${encodeURIComponent(v.task_id)}/fork${qs({ tenant: v.tenant })}`, { method: "POST", body });
          location.hash = `#/t/${encodeURIComponent(v.tenant)}/${encodeURIComponent(got.task_id)}`;
        } catch (err) { e.target.disabled = false; alert(err.message); }
      } }, "Fork from here")) : null));
}

// -- routing ----------------------------------------------------------------------------

async function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const m = path.match(/^\/t\/([^/]+)\/([^/]+)$/);
  try {
    if (m) await renderTask(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
    else await renderList(params);
  } catch (e) {
    if (e.status === 401) return boot();
    app.replaceChildren(h("p", { class: "notice bad" }, e.message));
  }
}

async function boot() {
  closeStreams();
  try {
    state.session = await api("/ui/session");
  } catch (e) {
    if (e.status === 401) return renderLogin();
    app.replaceChildren(h("p", { class: "notice bad" }, `The orchestrator did not answer: ${e.message}`));
    return;
  }
  const s = state.session;
  document.getElementById("who").textContent = s.auth === "open" ? "no API keys: open to every local process" : s.scope === "*" ? "operator: every tenant" : `tenant ${s.scope}`;
  const out = document.getElementById("logout");
  out.hidden = s.auth !== "session";
  out.onclick = async () => { await fetch("/ui/logout", { method: "POST", credentials: "same-origin" }); location.replace("/ui/"); };
  if (location.search) history.replaceState(null, "", `/ui/${location.hash}`);
  await route();
}

window.addEventListener("hashchange", route);
boot();
