// z4j dashboard: plain JavaScript, no build step, no framework.
//
// The page loads the REST API once (/api/v1/instances, agents, events,
// commands), then follows /ws/dashboard: heartbeats update the Instances
// table and the rate charts, stored events feed the live list, command and
// agent messages update their rows. When the socket drops it reconnects with
// capped exponential backoff (full jitter) and reloads the tables from the
// API once it is back, so nothing missed while away stays missing.
//
// Everything from the server is put in the page with textContent, never as
// HTML. Any 401 means the session is gone: back to /login.
"use strict";

(() => {
  const WINDOW_SECONDS = 300; // the charts' longest span
  const MIN_WINDOW_SECONDS = 30; // and their shortest, while the page is young
  const FEED_MAX = 100;
  const COMMANDS_MAX = 50; // rows shown
  const COMMANDS_KEPT = 200; // records remembered
  const STALE_MS = 15000; // an instance silent this long (or 3 heartbeats) is "stale"
  const RECONNECT_BASE_MS = 500;
  const RECONNECT_CAP_MS = 15000;
  const STABLE_SESSION_MS = 5000; // a socket open this long resets the backoff
  const POLL_MS = 30000; // a slow API refresh, belt and braces under the socket
  const OFFLINE_POLL_MS = 5000; // and a quicker one while the socket is down
  const TERMINAL = new Set(["completed", "failed", "timeout", "cancelled"]);
  const STATE_RANK = { pending: 0, dispatched: 1 };
  const STATE_CLASS = {
    pending: "warn",
    dispatched: "info live",
    completed: "ok",
    failed: "bad",
    timeout: "bad",
    cancelled: "",
  };

  const $ = (id) => document.getElementById(id);

  // -- small helpers ----------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value == null || value === false) continue;
        if (key === "class") node.className = value;
        else if (key === "text") node.textContent = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat()) {
      if (child == null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const nf0 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const nf1 = new Intl.NumberFormat(undefined, {
    minimumFractionDigits: 1,
    maximumFractionDigits: 1,
  });
  const nfCompact = new Intl.NumberFormat(undefined, {
    notation: "compact",
    maximumFractionDigits: 1,
  });

  function fmtRate(value) {
    if (value == null || !Number.isFinite(value)) return "–";
    if (value >= 100000) return nfCompact.format(value);
    if (value >= 100) return nf0.format(value);
    return nf1.format(value);
  }

  function fmtInt(value) {
    if (value == null || !Number.isFinite(value)) return "–";
    return value >= 1000000 ? nfCompact.format(value) : nf0.format(value);
  }

  function fmtAxis(value) {
    if (value >= 10000) return nfCompact.format(value);
    return Number.isInteger(value) ? nf0.format(value) : nf1.format(value);
  }

  function parseTime(iso) {
    if (!iso) return null;
    const ms = Date.parse(iso);
    return Number.isNaN(ms) ? null : ms;
  }

  // The brain's clock, as seen from here: times in the data are the brain's,
  // and a browser whose clock is off must not call every instance stale.
  let clockOffset = null;
  function serverNow() {
    return Date.now() - (clockOffset ?? 0);
  }

  function noteServerTime(iso) {
    const at = parseTime(iso);
    if (at == null) return;
    const sample = Date.now() - at; // the heartbeat was written just now
    clockOffset = clockOffset == null ? sample : clockOffset * 0.8 + sample * 0.2;
  }

  function ago(ms, now = serverNow()) {
    if (ms == null) return "–";
    const s = Math.max(0, Math.round((now - ms) / 1000));
    if (s < 2) return "just now";
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function clock(ms) {
    if (ms == null) return "";
    const d = new Date(ms);
    return [d.getHours(), d.getMinutes(), d.getSeconds()]
      .map((n) => String(n).padStart(2, "0"))
      .join(":");
  }

  function span(msValue) {
    if (msValue == null || msValue < 0) return "–";
    if (msValue < 1000) return `${Math.round(msValue)} ms`;
    if (msValue < 60000) return `${nf1.format(msValue / 1000)} s`;
    if (msValue < 3600000)
      return `${Math.floor(msValue / 60000)} min ${Math.round((msValue % 60000) / 1000)} s`;
    return `${nf1.format(msValue / 3600000)} h`;
  }

  const shortId = (id) => String(id ?? "").slice(0, 8);

  function preview(body, limit = 200) {
    let value = body;
    if (value == null) return "";
    if (typeof value === "string") {
      try {
        value = JSON.parse(value);
      } catch {
        return value.length > limit ? `${value.slice(0, limit)}…` : value;
      }
    }
    if (value && typeof value === "object" && !Array.isArray(value)) {
      value = { ...value };
      delete value.t;
      delete value.kind;
    }
    let text = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (text.length > limit) text = `${text.slice(0, limit)}…`;
    return text;
  }

  const KIND_COLORS = [
    "#6b93ff",
    "#34d3a0",
    "#f2b84b",
    "#b294ff",
    "#ff7a90",
    "#4cc9f0",
    "#f28c4b",
    "#9bd35a",
    "#e879c9",
    "#8fa3bf",
  ];
  const kindColors = new Map(); // kinds get palette colours in order of appearance
  function kindColor(kind) {
    const key = String(kind);
    if (!kindColors.has(key))
      kindColors.set(key, KIND_COLORS[kindColors.size % KIND_COLORS.length]);
    return kindColors.get(key);
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // -- the REST API ------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  let leaving = false;
  function toLogin() {
    if (!leaving) {
      leaving = true;
      location.replace("/login");
    }
  }

  // The session's CSRF token, from the cookie the sign-in set (readable by
  // this origin's scripts only): every state-changing request carries it.
  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === "z4j_csrf") return rest.join("=");
    }
    return "";
  }

  async function api(method, path, body) {
    const init = {
      method,
      credentials: "same-origin",
      headers: { accept: "application/json" },
    };
    if (method !== "GET" && method !== "HEAD") {
      init.headers["content-type"] = "application/json";
      init.headers["x-csrf-token"] = csrfToken();
    }
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401) {
      toLogin();
      throw new ApiError(401, "unauthorized", "signed out");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch {
      /* not JSON */
    }
    if (!response.ok) {
      throw new ApiError(
        response.status,
        (data && data.error) || `http_${response.status}`,
        (data && data.message) || `The brain answered ${response.status}.`,
      );
    }
    return data;
  }

  // -- state -------------------------------------------------------------------

  const instances = new Map(); // id -> instance row
  const beatInterval = new Map(); // id -> ms between its last two heartbeats
  const agents = new Map(); // id -> agent with workers
  const commands = new Map(); // id -> command record
  const feed = []; // newest first
  const feedIds = new Set();
  const freshIds = new Set(); // rows to flash on the next render
  const kinds = new Map(); // kind -> count since the page opened
  const pendingFeed = []; // events held while the feed is paused
  let feedPaused = false;
  let servedBy = null; // the instance this page's socket talks to
  let showStopped = false;
  let eventsThisSecond = 0;
  const pageOpened = Date.now();

  const series = { t: [], ingest: [], drain: [], depth: [], events: [] };

  // -- rendering, coalesced per frame ---------------------------------------------

  const dirty = new Set();
  let frame = 0;
  function mark(...parts) {
    for (const part of parts) dirty.add(part);
    if (!frame) frame = requestAnimationFrame(flush);
  }

  function flush() {
    frame = 0;
    const parts = [...dirty];
    dirty.clear();
    for (const part of parts) {
      try {
        RENDER[part]();
      } catch (error) {
        console.error(`rendering ${part} failed`, error);
      }
    }
  }

  function instanceStatus(row, now) {
    if (row.stopped_at) return { label: "stopped", cls: "" };
    const seen = parseTime(row.last_seen);
    const limit = Math.max(STALE_MS, 3 * (beatInterval.get(String(row.id)) ?? 0));
    if (seen == null || now - seen > limit) return { label: "stale", cls: "warn" };
    return { label: "live", cls: "ok live" };
  }

  function totals(now = serverNow()) {
    let ingest = 0;
    let drain = 0;
    let depth = 0;
    let live = 0;
    for (const row of instances.values()) {
      if (row.stopped_at) continue;
      depth += Number(row.buffer_depth) || 0;
      if (instanceStatus(row, now).label !== "live") continue;
      live += 1;
      ingest += Number(row.ingest_rate) || 0;
      drain += Number(row.drain_rate) || 0;
    }
    return { ingest, drain, depth, live };
  }

  function renderInstances() {
    const now = serverNow();
    const body = $("instances-table").tBodies[0];
    const rows = [...instances.values()];
    const order = { live: 0, stale: 1, stopped: 2 };
    rows.sort((a, b) => {
      const sa = order[instanceStatus(a, now).label];
      const sb = order[instanceStatus(b, now).label];
      if (sa !== sb) return sa - sb;
      return (
        String(a.name).localeCompare(String(b.name)) || String(a.id).localeCompare(String(b.id))
      );
    });
    const { ingest: totalIngest } = totals(now);
    const stopped = rows.filter((r) => r.stopped_at).length;
    const shown = showStopped ? rows : rows.filter((r) => !r.stopped_at);
    body.replaceChildren(
      ...shown.map((row) => {
        const status = instanceStatus(row, now);
        const live = status.label === "live";
        const share = live && totalIngest > 0 ? (Number(row.ingest_rate) || 0) / totalIngest : 0;
        const bar = el("i");
        bar.style.width = `${Math.round(share * 100)}%`;
        const seen = parseTime(row.last_seen);
        return el(
          "tr",
          { dataset: { id: row.id }, class: row.stopped_at ? "dim" : null },
          el(
            "td",
            null,
            el(
              "div",
              { class: "primary" },
              row.name || shortId(row.id),
              " ",
              String(row.id) === String(servedBy)
                ? el("span", {
                    class: "tag you",
                    title: "This page's live feed comes from this instance",
                    text: "this page",
                  })
                : null,
            ),
            el("div", { class: "secondary mono", title: row.id, text: row.id }),
          ),
          el("td", { text: row.host || "–" }),
          el("td", { class: "num mono", text: row.pid ?? "–" }),
          el("td", {
            class: "num",
            dataset: { col: "ingest" },
            text: live ? fmtRate(row.ingest_rate) : "–",
          }),
          el("td", {
            class: "num",
            dataset: { col: "drain" },
            text: live ? fmtRate(row.drain_rate) : "–",
          }),
          el("td", {
            class: "num",
            dataset: { col: "depth" },
            text: row.stopped_at ? "–" : fmtInt(row.buffer_depth),
          }),
          el(
            "td",
            { class: "num" },
            el(
              "div",
              { class: "share" },
              el("span", { text: live ? `${Math.round(share * 100)}%` : "–" }),
              el("span", { class: "track" }, bar),
            ),
          ),
          el("td", null, el("span", { class: `pill ${status.cls}`, text: status.label })),
          el("td", {
            class: "num",
            title: row.last_seen || "",
            dataset: { ago: seen ?? "" },
            text: ago(seen, now),
          }),
        );
      }),
    );
    $("instances-empty").hidden = shown.length > 0;
    const liveCount = rows.filter((r) => instanceStatus(r, now).label === "live").length;
    const hint = $("instances-hint");
    hint.replaceChildren(`${liveCount} live`);
    if (stopped) {
      hint.append(
        ` · ${stopped} stopped `,
        el("button", {
          class: "btn small",
          type: "button",
          text: showStopped ? "hide" : "show",
          onclick: () => {
            showStopped = !showStopped;
            mark("instances");
          },
        }),
      );
    }
  }

  function agentLabel(agentId) {
    const agent = agents.get(String(agentId));
    if (!agent) return shortId(agentId);
    return agent.project ? `${agent.project} / ${agent.name}` : agent.name;
  }

  function renderAgents() {
    const now = serverNow();
    const body = $("agents-table").tBodies[0];
    const list = [...agents.values()].sort(
      (a, b) =>
        String(a.project).localeCompare(String(b.project)) ||
        String(a.name).localeCompare(String(b.name)),
    );
    const rows = [];
    let connected = 0;
    let workersTotal = 0;
    for (const agent of list) {
      const workers = [...(agent.workers || [])].sort(
        (a, b) =>
          Number(b.connected) - Number(a.connected) ||
          String(a.worker_id).localeCompare(String(b.worker_id)),
      );
      const live = workers.filter((w) => w.connected).length;
      connected += live;
      workersTotal += workers.length;
      rows.push(
        el(
          "tr",
          { class: "agent-row", dataset: { agent: agent.id } },
          el(
            "td",
            { class: "nowrap", title: `agent ${agent.id}` },
            agent.name,
            " ",
            agent.project ? el("span", { class: "tag", text: agent.project }) : null,
          ),
          el(
            "td",
            null,
            agent.revoked
              ? el("span", { class: "pill bad", text: "revoked" })
              : el("span", {
                  class: `pill ${live ? "ok" : ""}`,
                  text: `${live} of ${workers.length} live`,
                }),
          ),
          el("td"),
          el("td", {
            class: "num secondary",
            title: agent.created_at || "",
            dataset: { ago: parseTime(agent.created_at) ?? "" },
            text: ago(parseTime(agent.created_at), now),
          }),
        ),
      );
      const recent = workers.filter(
        (w) => w.connected || now - (parseTime(w.disconnected_at || w.last_seen) ?? 0) < 3600000,
      );
      for (const worker of recent.slice(0, 12)) {
        const since = parseTime(
          worker.connected ? worker.connected_at : worker.disconnected_at || worker.last_seen,
        );
        rows.push(
          el(
            "tr",
            { class: "worker-row", dataset: { agent: agent.id, worker: worker.worker_id } },
            el(
              "td",
              { class: "nowrap" },
              el("span", { class: "mono", text: worker.worker_id }),
              " ",
              worker.role ? el("span", { class: "tag", text: worker.role }) : null,
            ),
            el(
              "td",
              null,
              el("span", {
                class: `pill ${worker.connected ? "ok" : ""}`,
                text: worker.connected ? "connected" : "disconnected",
              }),
            ),
            el(
              "td",
              { class: "mono secondary nowrap", title: worker.instance_id || "" },
              worker.instance_id ? shortId(worker.instance_id) : "–",
              worker.connected && String(worker.instance_id) === String(servedBy)
                ? [" ", el("span", { class: "tag you", text: "this" })]
                : null,
            ),
            el("td", {
              class: "num secondary",
              dataset: { ago: since ?? "" },
              text: ago(since, now),
            }),
          ),
        );
      }
      if (recent.length < workers.length || recent.length > 12) {
        const hidden = workers.length - Math.min(recent.length, 12);
        rows.push(
          el(
            "tr",
            { class: "worker-row" },
            el("td", {
              class: "secondary",
              colspan: 4,
              text: `+ ${hidden} older disconnected worker${hidden === 1 ? "" : "s"}`,
            }),
          ),
        );
      }
    }
    body.replaceChildren(...rows);
    $("agents-empty").hidden = list.length > 0;
    $("agents-hint").textContent = list.length
      ? `${list.length} agent${list.length === 1 ? "" : "s"}`
      : "";
    $("kpi-workers").textContent = fmtInt(connected);
    $("kpi-workers-of").textContent = `of ${fmtInt(workersTotal)}`;
    renderAgentOptions();
  }

  function renderAgentOptions() {
    const select = $("cmd-agent");
    const previous = select.value;
    const list = [...agents.values()].sort(
      (a, b) =>
        String(a.project).localeCompare(String(b.project)) ||
        String(a.name).localeCompare(String(b.name)),
    );
    select.replaceChildren(
      ...list.map((agent) => {
        const live = (agent.workers || []).filter((w) => w.connected).length;
        return el("option", {
          value: agent.id,
          disabled: agent.revoked || null,
          text: `${agentLabel(agent.id)} (${agent.revoked ? "revoked" : `${live} live`})`,
        });
      }),
    );
    if (!list.length) select.append(el("option", { value: "", text: "no agents" }));
    if (previous && agents.has(previous)) select.value = previous;
    else {
      const best = list.find((a) => !a.revoked && (a.workers || []).some((w) => w.connected));
      if (best) select.value = best.id;
    }
  }

  function renderFeed() {
    const list = $("feed");
    list.replaceChildren(
      ...feed.map((event) => {
        const at = parseTime(event.received_at);
        const swatch = el("i");
        swatch.style.background = kindColor(event.kind);
        const who = event.agent_id
          ? `${agentLabel(event.agent_id)}${event.worker_id ? ` · ${event.worker_id}` : ""}`
          : null;
        return el(
          "li",
          {
            dataset: { id: event.id ?? "", kind: event.kind },
            class: freshIds.has(`e:${event._key}`) ? "new" : null,
          },
          el("span", { class: "time", title: event.received_at || "", text: clock(at) }),
          el("span", { class: "kind", title: event.kind }, swatch, event.kind),
          el(
            "span",
            { class: "body", title: preview(event.body, 2000) },
            el("span", { class: "tag src", text: event.source || "?" }),
            who ? el("span", { class: "muted", text: `${who}  ` }) : null,
            el("span", { class: "mono", text: preview(event.body) }),
          ),
        );
      }),
    );
    for (const key of [...freshIds]) if (key.startsWith("e:")) freshIds.delete(key);
    $("feed-empty").hidden = feed.length > 0;
    const held = pendingFeed.length;
    $("feed-hint").textContent = feedPaused
      ? `paused${held ? `, ${held} waiting` : ""}`
      : "newest first";
  }

  function renderKinds() {
    const sorted = [...kinds.entries()].sort((a, b) => b[1] - a[1]);
    const top = sorted.slice(0, 8);
    const rest = sorted.slice(8).reduce((sum, [, n]) => sum + n, 0);
    if (rest) top.push(["other kinds", rest]);
    const max = Math.max(1, ...top.map(([, n]) => n));
    $("kinds").replaceChildren(
      ...top.map(([kind, count]) => {
        const bar = el("i");
        bar.style.width = `${Math.max(2, (count / max) * 100)}%`;
        bar.style.background = kind === "other kinds" ? cssVar("--idle") : kindColor(kind);
        return el(
          "li",
          { dataset: { kind } },
          el("span", { class: "trunc", text: kind }),
          el("span", { class: "num", text: fmtInt(count) }),
          el("span", { class: "bar" }, bar),
        );
      }),
    );
    $("kinds-empty").hidden = top.length > 0;
  }

  function renderCommands() {
    const now = serverNow();
    const body = $("commands-table").tBodies[0];
    const list = [...commands.values()]
      .sort((a, b) => (parseTime(b.created_at) ?? 0) - (parseTime(a.created_at) ?? 0))
      .slice(0, COMMANDS_MAX);
    body.replaceChildren(
      ...list.map((rec) => {
        const id = String(rec.id);
        const created = parseTime(rec.created_at);
        const finished = parseTime(rec.finished_at);
        const running = !TERMINAL.has(rec.state);
        let result = null;
        if (rec.error)
          result = el("span", {
            class: "trunc mono",
            title: String(rec.error),
            text: preview(rec.error, 120),
          });
        else if (rec.result != null)
          result = el("span", {
            class: "trunc mono",
            title: preview(rec.result, 2000),
            text: preview(rec.result, 120),
          });
        const state = el("span", {
          class: `pill ${STATE_CLASS[rec.state] ?? ""}`,
          dataset: { state: rec.state },
          text: rec.state,
        });
        return el(
          "tr",
          { dataset: { id, state: rec.state }, class: freshIds.has(`c:${id}`) ? "flash" : null },
          el("td", { class: "mono", title: id, text: shortId(id) }),
          el("td", { text: agentLabel(rec.agent_id) }),
          el("td", { class: "mono", text: rec.action }),
          el("td", { class: "state" }, state),
          el("td", { class: "mono secondary", text: rec.worker_id || "–" }),
          el("td", {
            class: "num",
            title: rec.created_at || "",
            dataset: { ago: created ?? "" },
            text: ago(created, now),
          }),
          el("td", {
            class: "num",
            dataset: running && created != null ? { since: created } : null,
            text: running
              ? span(now - (created ?? now))
              : span(finished != null && created != null ? finished - created : null),
          }),
          el(
            "td",
            { class: "trunc" },
            rec.error ? [el("span", { class: "pill bad plain", text: "error" }), " "] : null,
            result,
          ),
          el(
            "td",
            { class: "num" },
            running
              ? el("button", {
                  class: "btn small danger",
                  type: "button",
                  text: "Cancel",
                  onclick: (event) => cancelCommand(rec.id, event.currentTarget),
                })
              : null,
          ),
        );
      }),
    );
    for (const key of [...freshIds]) if (key.startsWith("c:")) freshIds.delete(key);
    $("commands-empty").hidden = list.length > 0;
    const open = [...commands.values()].filter((c) => !TERMINAL.has(c.state)).length;
    $("kpi-commands").textContent = open
      ? `${open} command${open === 1 ? "" : "s"} in flight`
      : "no commands in flight";
  }

  function renderKpis() {
    const t = totals();
    const n = series.events.length;
    const recent = series.events.slice(Math.max(0, n - 5));
    const eventsRate = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : null;
    const anyInstance = instances.size > 0;
    $("kpi-ingest").textContent = anyInstance ? fmtRate(t.ingest) : "–";
    $("kpi-drain").textContent = anyInstance ? fmtRate(t.drain) : "–";
    $("kpi-depth").textContent = anyInstance ? fmtInt(t.depth) : "–";
    $("kpi-events").textContent = eventsRate == null ? "–" : fmtRate(eventsRate);
    $("legend-ingest").textContent = anyInstance ? fmtRate(t.ingest) : "–";
    $("legend-drain").textContent = anyInstance ? fmtRate(t.drain) : "–";
  }

  // -- charts ---------------------------------------------------------------------

  function canvasContext(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return { ctx, w, h };
  }

  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const exp = 10 ** Math.floor(Math.log10(value));
    const f = value / exp;
    const step = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return step * exp;
  }

  // The charts span 30 s while the page is young, then whole minutes up to 5.
  function chartWindow(now) {
    const age = (now - pageOpened) / 1000;
    const seconds = age <= MIN_WINDOW_SECONDS ? MIN_WINDOW_SECONDS : Math.ceil(age / 60) * 60;
    return Math.min(WINDOW_SECONDS, seconds) * 1000;
  }

  function path(ctx, xs, ys) {
    let started = false;
    for (let i = 0; i < xs.length; i++) {
      if (ys[i] == null) {
        started = false;
        continue;
      }
      if (started) ctx.lineTo(xs[i], ys[i]);
      else {
        ctx.moveTo(xs[i], ys[i]);
        started = true;
      }
    }
  }

  function drawLine(ctx, xs, ys, color, baseline, fill) {
    if (!xs.length) return;
    if (fill) {
      const top = Math.min(...ys.filter((y) => y != null));
      const gradient = ctx.createLinearGradient(0, top, 0, baseline);
      gradient.addColorStop(0, withAlpha(color, 0.28));
      gradient.addColorStop(1, withAlpha(color, 0));
      ctx.beginPath();
      ctx.moveTo(xs[0], baseline);
      for (let i = 0; i < xs.length; i++) ctx.lineTo(xs[i], ys[i] ?? baseline);
      ctx.lineTo(xs[xs.length - 1], baseline);
      ctx.closePath();
      ctx.fillStyle = gradient;
      ctx.fill();
    }
    ctx.beginPath();
    path(ctx, xs, ys);
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.lineCap = "round";
    ctx.stroke();
  }

  const probe = document.createElement("canvas").getContext("2d");
  function withAlpha(color, alpha) {
    probe.fillStyle = "#000";
    probe.fillStyle = color;
    const normal = probe.fillStyle; // #rrggbb or rgba(...)
    if (normal.startsWith("#")) {
      const n = parseInt(normal.slice(1), 16);
      return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
    }
    return normal.replace(/rgba?\(([^)]+)\)/, (_, inner) => {
      const [r, g, b] = inner.split(",").map((s) => s.trim());
      return `rgba(${r}, ${g}, ${b}, ${alpha})`;
    });
  }

  let hoverX = null;

  function drawRateChart() {
    const canvas = $("rate-chart");
    const { ctx, w, h } = canvasContext(canvas);
    const now = Date.now();
    const windowMs = chartWindow(now);
    const start = now - windowMs;
    const pad = { l: 52, r: 10, t: 12, b: 24 };
    const minutes = windowMs / 60000;
    const spanText =
      minutes < 1 ? `${windowMs / 1000} s` : minutes === 1 ? "minute" : `${minutes} min`;
    $("rates-hint").textContent = `records/s, all live instances, last ${spanText}`;
    const plotW = w - pad.l - pad.r;
    const plotH = h - pad.t - pad.b;
    const from = series.t.findIndex((t) => t >= start);
    const idx = from < 0 ? [] : series.t.slice(from).map((_, i) => i + from);
    const max = niceCeil(
      Math.max(1, ...idx.map((i) => Math.max(series.ingest[i], series.drain[i]))) * 1.08,
    );
    const muted = cssVar("--muted");
    ctx.font = `11px ${cssVar("--font")}`;
    ctx.fillStyle = muted;
    ctx.strokeStyle = cssVar("--grid");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = Math.round(pad.t + plotH * (1 - i / 4)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(w - pad.r, y);
      ctx.stroke();
      ctx.fillText(fmtAxis((max * i) / 4), pad.l - 8, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const stepS = windowMs <= 30000 ? 5 : windowMs <= 60000 ? 15 : 60;
    for (let s = 0; s <= windowMs / 1000; s += stepS) {
      const x = pad.l + plotW * (1 - (s * 1000) / windowMs);
      const label = s === 0 ? "now" : stepS === 60 ? `−${s / 60} min` : `−${s} s`;
      ctx.textAlign = s === 0 ? "right" : "center";
      ctx.fillText(label, s === 0 ? w - pad.r : x, h - pad.b + 7);
    }
    if (!idx.length) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("Waiting for heartbeats…", pad.l + plotW / 2, pad.t + plotH / 2);
      return;
    }
    const xs = idx.map((i) => pad.l + plotW * ((series.t[i] - start) / windowMs));
    const y = (v) => pad.t + plotH * (1 - v / max);
    const baseline = pad.t + plotH;
    drawLine(
      ctx,
      xs,
      idx.map((i) => y(series.ingest[i])),
      cssVar("--ingest"),
      baseline,
      true,
    );
    drawLine(
      ctx,
      xs,
      idx.map((i) => y(series.drain[i])),
      cssVar("--drain"),
      baseline,
      false,
    );

    const tip = $("rate-tip");
    if (hoverX == null || hoverX < pad.l || hoverX > w - pad.r) {
      tip.hidden = true;
      return;
    }
    let best = 0;
    for (let k = 1; k < xs.length; k++)
      if (Math.abs(xs[k] - hoverX) < Math.abs(xs[best] - hoverX)) best = k;
    const i = idx[best];
    ctx.strokeStyle = cssVar("--border-strong");
    ctx.beginPath();
    ctx.moveTo(Math.round(xs[best]) + 0.5, pad.t);
    ctx.lineTo(Math.round(xs[best]) + 0.5, baseline);
    ctx.stroke();
    for (const [key, color] of [
      ["ingest", cssVar("--ingest")],
      ["drain", cssVar("--drain")],
    ]) {
      ctx.beginPath();
      ctx.arc(xs[best], y(series[key][i]), 3.5, 0, Math.PI * 2);
      ctx.fillStyle = color;
      ctx.fill();
    }
    tip.replaceChildren(
      el("div", { class: "muted", text: clock(series.t[i]) }),
      el("div", null, "ingest ", el("b", { text: fmtRate(series.ingest[i]) })),
      el("div", null, "drain ", el("b", { text: fmtRate(series.drain[i]) })),
      el("div", null, "buffer ", el("b", { text: fmtInt(series.depth[i]) })),
    );
    tip.hidden = false;
    const left = xs[best] + 12 + 120 > w ? xs[best] - 12 - tip.offsetWidth : xs[best] + 12;
    tip.style.left = `${left + 4}px`;
    tip.style.top = `${pad.t + 8}px`;
  }

  function drawSpark(id, key, colorVar, bars) {
    const canvas = $(id);
    const { ctx, w, h } = canvasContext(canvas);
    const now = Date.now();
    const start = now - chartWindow(now);
    const from = series.t.findIndex((t) => t >= start);
    if (from < 0) return;
    const ts = series.t.slice(from);
    const vs = series[key].slice(from);
    const max = Math.max(1, ...vs) * 1.1;
    const color = cssVar(colorVar);
    const x = (t) => 1 + (w - 2) * ((t - start) / (now - start));
    const y = (v) => h - 2 - (h - 4) * (v / max);
    if (bars) {
      const width = Math.max(1, (w / ((now - start) / 1000)) * 0.7);
      ctx.fillStyle = withAlpha(color, 0.8);
      ts.forEach((t, i) => {
        if (vs[i] > 0) ctx.fillRect(x(t) - width, y(vs[i]), width, h - 2 - y(vs[i]));
      });
      return;
    }
    drawLine(ctx, ts.map(x), vs.map(y), color, h, true);
  }

  function drawCharts() {
    drawRateChart();
    drawSpark("spark-ingest", "ingest", "--ingest");
    drawSpark("spark-drain", "drain", "--drain");
    drawSpark("spark-depth", "depth", "--depth");
    drawSpark("spark-events", "events", "--events", true);
  }

  const RENDER = {
    instances: renderInstances,
    agents: renderAgents,
    feed: renderFeed,
    kinds: renderKinds,
    commands: renderCommands,
    kpis: renderKpis,
    charts: drawCharts,
  };

  // -- state changes -----------------------------------------------------------------

  function upsertInstance(row) {
    if (!row || row.id == null) return;
    const previous = instances.get(String(row.id));
    const before = previous ? parseTime(previous.last_seen) : null;
    const after = parseTime(row.last_seen);
    if (before != null && after != null && after > before) {
      beatInterval.set(String(row.id), after - before); // its heartbeat period
    }
    instances.set(String(row.id), row);
    mark("instances", "kpis");
  }

  function setAgents(items) {
    agents.clear();
    for (const agent of items) agents.set(String(agent.id), agent);
    mark("agents", "commands", "feed");
  }

  // JSON with object keys sorted: the same value whatever order a store kept.
  function canonical(value) {
    if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
    if (value && typeof value === "object") {
      const keys = Object.keys(value).sort();
      return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
    }
    return JSON.stringify(value) ?? "null";
  }

  // One event seen twice (in a live sample, then in the list reloaded after a
  // reconnect) must show once. Samples on the socket need not carry the
  // store's row id, so an event is known by its idempotency key when it has
  // one, else by what it is: time, origin, kind and body.
  function eventKey(event) {
    const key = event.key ?? event.idempotency_key;
    if (key != null) return `k:${key}`;
    return [
      "c",
      parseTime(event.received_at),
      event.source,
      event.agent_id ?? "",
      event.worker_id ?? "",
      event.kind,
      canonical(event.body),
    ].join("|");
  }

  let lastFlash = 0;
  function addEvents(items, { live }) {
    let added = false;
    const fresh = [];
    for (const item of items) {
      if (!item || typeof item !== "object") continue;
      const key = eventKey(item);
      if (feedIds.has(key)) {
        if (item.id != null) {
          const known = feed.find((e) => e._key === key);
          if (known && known.id == null) known.id = item.id;
        }
        continue;
      }
      const event = { ...item, _key: key };
      if (live && feedPaused) {
        if (!pendingFeed.some((e) => e._key === key)) pendingFeed.push(event);
        continue;
      }
      feedIds.add(key);
      feed.push(event);
      fresh.push(key);
      added = true;
    }
    // Highlight what arrives at a reading pace; a flood is not highlighted.
    const now = Date.now();
    if (live && fresh.length <= 5 && now - lastFlash > 800) {
      for (const key of fresh) freshIds.add(`e:${key}`);
      lastFlash = now;
    }
    if (!added) {
      if (feedPaused) mark("feed");
      return;
    }
    feed.sort(
      (a, b) =>
        (parseTime(b.received_at) ?? 0) - (parseTime(a.received_at) ?? 0) ||
        Number(b.id ?? Infinity) - Number(a.id ?? Infinity) ||
        0,
    );
    for (const dropped of feed.splice(FEED_MAX)) feedIds.delete(dropped._key);
    mark("feed");
  }

  function upsertCommand(rec, { flash }) {
    if (!rec || rec.id == null) return;
    const id = String(rec.id);
    const previous = commands.get(id);
    if (previous && TERMINAL.has(previous.state) && !TERMINAL.has(rec.state)) return;
    if (previous && (STATE_RANK[rec.state] ?? 2) < (STATE_RANK[previous.state] ?? 2)) return;
    commands.set(id, rec);
    if (commands.size > COMMANDS_KEPT) {
      const oldest = [...commands.values()]
        .sort((a, b) => (parseTime(a.created_at) ?? 0) - (parseTime(b.created_at) ?? 0))
        .slice(0, commands.size - COMMANDS_KEPT);
      for (const old of oldest) commands.delete(String(old.id));
    }
    if (flash && (!previous || previous.state !== rec.state)) freshIds.add(`c:${id}`);
    mark("commands");
  }

  let agentsTimer = 0;
  function refreshAgentsSoon() {
    clearTimeout(agentsTimer);
    agentsTimer = setTimeout(() => {
      api("GET", "/api/v1/agents")
        .then((data) => setAgents(data.items || []))
        .catch(() => {});
    }, 400);
  }

  function onAgentMessage(msg) {
    const agent = agents.get(String(msg.agent_id));
    const worker = agent && (agent.workers || []).find((w) => w.worker_id === msg.worker_id);
    if (worker) {
      const nowIso = new Date(serverNow()).toISOString();
      worker.connected = msg.state === "connected";
      if (worker.connected) {
        worker.connected_at = nowIso;
        if (msg.instance_id) worker.instance_id = msg.instance_id;
      } else {
        worker.disconnected_at = nowIso;
      }
      mark("agents");
    }
    refreshAgentsSoon(); // the API has the whole truth (roles, new workers)
  }

  function onMessage(msg) {
    switch (msg.type) {
      case "hello":
        setConn("live");
        servedBy = msg.instance_id ?? null;
        $("served-by").textContent = servedBy ? `via ${shortId(servedBy)}` : "";
        $("served-by").title = servedBy ? `live feed from instance ${servedBy}` : "";
        $("served-by").hidden = !servedBy;
        mark("instances", "agents");
        break;
      case "instance":
        if (msg.instance && !msg.instance.stopped_at) noteServerTime(msg.instance.last_seen);
        upsertInstance(msg.instance);
        break;
      case "events": {
        const count = Number(msg.count) || 0;
        eventsThisSecond += count;
        for (const [kind, n] of Object.entries(msg.kinds || {}))
          kinds.set(kind, (kinds.get(kind) || 0) + (Number(n) || 0));
        if (!msg.kinds && Array.isArray(msg.sample)) {
          for (const event of msg.sample) kinds.set(event.kind, (kinds.get(event.kind) || 0) + 1);
        }
        addEvents(Array.isArray(msg.sample) ? msg.sample : [], { live: true });
        mark("kinds");
        break;
      }
      case "command":
        upsertCommand(msg.command, { flash: true });
        break;
      case "agent":
        onAgentMessage(msg);
        break;
      default:
        break; // newer brains may send more; ignore what we do not know
    }
  }

  // -- loading from the API ------------------------------------------------------------

  let refreshing = null;
  function refreshAll() {
    if (refreshing) return refreshing;
    refreshing = Promise.allSettled([
      api("GET", "/api/v1/instances").then((data) => {
        instances.clear();
        for (const row of data.items || []) upsertInstance(row);
        mark("instances", "kpis");
      }),
      api("GET", "/api/v1/agents").then((data) => setAgents(data.items || [])),
      api("GET", "/api/v1/events?limit=50").then((data) =>
        addEvents(data.items || [], { live: false }),
      ),
      api("GET", "/api/v1/commands?limit=50").then((data) => {
        for (const rec of data.items || []) upsertCommand(rec, { flash: false });
      }),
    ]).finally(() => {
      refreshing = null;
    });
    return refreshing;
  }

  // -- the live socket -------------------------------------------------------------------

  let socket = null;
  let attempt = 0;
  let openedAt = 0;
  let retryAt = 0;
  let retryTimer = 0;

  function setConn(state) {
    const pill = $("conn");
    pill.dataset.state = state;
    if (state === "live") {
      pill.className = "pill ok live";
      pill.textContent = "Live";
    } else if (state === "connecting") {
      pill.className = "pill info";
      pill.textContent = "Connecting…";
    } else {
      const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      pill.className = "pill warn";
      pill.textContent = seconds ? `Reconnecting in ${seconds} s` : "Reconnecting…";
    }
  }

  function connect() {
    clearTimeout(retryTimer);
    setConn("connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      // The CSRF token shows the brain that this page, not another site, opens it.
      const csrf = encodeURIComponent(csrfToken());
      ws = new WebSocket(`${scheme}//${location.host}/ws/dashboard?csrf=${csrf}`);
    } catch {
      scheduleReconnect(false);
      return;
    }
    socket = ws;
    ws.addEventListener("open", () => {
      openedAt = Date.now(); // "live" once the brain says hello (it may refuse us first)
      refreshAll();
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      if (msg && typeof msg === "object") onMessage(msg);
    });
    ws.addEventListener("close", (event) => {
      if (socket !== ws) return;
      socket = null;
      if (event.code === 4401) {
        toLogin(); // the session expired or was signed out elsewhere
        return;
      }
      const wasOpen = openedAt !== 0;
      if (wasOpen && Date.now() - openedAt >= STABLE_SESSION_MS) attempt = 0;
      openedAt = 0;
      scheduleReconnect(wasOpen);
    });
  }

  function scheduleReconnect(wasOpen) {
    if (leaving) return;
    const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** attempt);
    attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    retryAt = Date.now() + delay;
    setConn("retry");
    retryTimer = setTimeout(connect, delay);
    if (!wasOpen) {
      // A refused handshake hides its status from scripts: ask the API
      // whether the session is still good (a 401 goes back to sign-in).
      api("GET", "/api/v1/instances").catch(() => {});
    }
  }

  // -- the operator's actions ---------------------------------------------------------------

  function showCommandError(text) {
    const box = $("cmd-error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  $("command-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    showCommandError("");
    const agent = $("cmd-agent").value;
    const action = $("cmd-action").value.trim();
    const timeout = Number($("cmd-timeout").value);
    let parameters;
    try {
      parameters = JSON.parse($("cmd-params").value.trim() || "{}");
    } catch (error) {
      showCommandError(`Parameters are not valid JSON: ${error.message}`);
      return;
    }
    if (!parameters || typeof parameters !== "object" || Array.isArray(parameters)) {
      showCommandError('Parameters must be a JSON object, like {} or {"task_id": "t-1"}.');
      return;
    }
    if (!agent) {
      showCommandError("Choose an agent.");
      return;
    }
    const button = $("cmd-send");
    button.disabled = true;
    try {
      const body = { agent, action, parameters };
      if (Number.isFinite(timeout) && timeout > 0) body.timeout_seconds = timeout;
      const record = await api("POST", "/api/v1/commands", body);
      upsertCommand(record, { flash: true });
    } catch (error) {
      if (error.status !== 401) showCommandError(error.message || "The command was not sent.");
    } finally {
      button.disabled = false;
    }
  });

  async function cancelCommand(id, button) {
    button.disabled = true;
    try {
      const record = await api("POST", `/api/v1/commands/${encodeURIComponent(id)}/cancel`);
      if (record && record.id != null) upsertCommand(record, { flash: true });
    } catch (error) {
      if (error.status !== 401) showCommandError(error.message);
      button.disabled = false;
    }
  }

  $("sign-out").addEventListener("click", async () => {
    try {
      await api("DELETE", "/api/v1/session");
    } catch {
      /* signed out either way */
    }
    toLogin();
  });

  $("feed-pause").addEventListener("click", (event) => {
    feedPaused = !feedPaused;
    event.currentTarget.textContent = feedPaused ? "Resume" : "Pause";
    event.currentTarget.setAttribute("aria-pressed", String(feedPaused));
    if (!feedPaused) addEvents(pendingFeed.splice(0), { live: true });
    mark("feed");
  });

  function effectiveTheme() {
    const chosen = document.documentElement.dataset.theme;
    if (chosen) return chosen;
    return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  const storedTheme = localStorage.getItem("z4j-theme");
  if (storedTheme === "light" || storedTheme === "dark")
    document.documentElement.dataset.theme = storedTheme;
  $("theme-toggle").addEventListener("click", () => {
    const next = effectiveTheme() === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("z4j-theme", next);
    mark("charts", "kinds");
  });
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () =>
    mark("charts", "kinds"),
  );

  const rateCanvas = $("rate-chart");
  rateCanvas.addEventListener("mousemove", (event) => {
    hoverX = event.clientX - rateCanvas.getBoundingClientRect().left;
    mark("charts");
  });
  rateCanvas.addEventListener("mouseleave", () => {
    hoverX = null;
    mark("charts");
  });
  window.addEventListener("resize", () => mark("charts"));

  // -- the clock: one sample a second -----------------------------------------------------------

  function tick() {
    const local = Date.now();
    const now = serverNow();
    const t = totals(now);
    if (instances.size) {
      series.t.push(local);
      series.ingest.push(t.ingest);
      series.drain.push(t.drain);
      series.depth.push(t.depth);
      series.events.push(eventsThisSecond);
    }
    eventsThisSecond = 0;
    const excess = series.t.length - WINDOW_SECONDS - 5;
    if (excess > 0) for (const key of Object.keys(series)) series[key].splice(0, excess);
    for (const node of document.querySelectorAll("[data-ago]")) {
      const ms = Number(node.dataset.ago);
      if (node.dataset.ago !== "" && Number.isFinite(ms)) node.textContent = ago(ms, now);
    }
    for (const node of document.querySelectorAll("[data-since]")) {
      node.textContent = span(now - Number(node.dataset.since));
    }
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      if (retryAt > local) setConn("retry");
    }
    mark("instances", "kpis", "charts");
  }

  setInterval(tick, 1000);
  // Under the socket, a slow refresh; without it (a proxy that drops
  // WebSockets, say), a faster one keeps the tables roughly current.
  let lastPoll = Date.now();
  setInterval(() => {
    const live = socket && socket.readyState === WebSocket.OPEN;
    if (Date.now() - lastPoll >= (live ? POLL_MS : OFFLINE_POLL_MS)) {
      lastPoll = Date.now();
      refreshAll();
    }
  }, 1000);

  mark("instances", "agents", "feed", "kinds", "commands", "kpis", "charts");
  refreshAll();
  connect();
})();
