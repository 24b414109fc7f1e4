// z4j dashboard: plain JavaScript, no build step, no framework.
//
// The page loads the REST API once (/api/v1/instances, agents, events,
// commands), then follows /ws/dashboard: heartbeats update the Instances
// table and the rate charts, stored events feed the live list, command and
// agent messages update their rows. When the socket drops it reconnects with
// capped exponential backoff (full jitter) and reloads the tables from the
// API once it is back, so nothing missed while away stays missing.
//
// Five more pages hang off the address's hash: #/tasks (the task
// projection, /api/v1/tasks, reloaded at most once a second while task
// events are being stored), #/tasks/<engine>/<id> (one task, and the retry
// and cancel its agent offers), #/queues (depths, outcomes, a two-step
// purge, and a queue's dead letters asked of its agent), #/workers (the
// engines' own workers, with celery's worker controls where offered) and
// #/schedules (what the scheduler adapters publish: enable, disable, run
// now, delete, and "Sync now"). #/fleet lists the OpAMP agents,
// #/fleet/<instance uid> shows one (attributes, health, effective against
// desired configuration) with an editor that pushes its configuration, and
// #/rollouts follows staged rollouts where the brain serves them.
// #/dead-letters lists the payloads this instance's drain set aside (inspect,
// re-queue, discard), #/workers also shows each worker's task registry, and
// #/audit reads the audit log with filters, an "Older" page at a time.
// #/users and #/tokens (accounts, personal API tokens) live in accounts.js,
// #/projects and #/agents (provisioning) in provisioning.js, and #/search
// (event search, its histogram and exports) in search.js.
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
    for (const child of children.flat(Infinity)) {
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
    constructor(status, code, message, data) {
      super(message);
      this.status = status;
      this.code = code;
      this.data = data || {}; // the whole JSON refusal (purge's "depth", say)
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
        data,
      );
    }
    return data;
  }

  // -- state -------------------------------------------------------------------

  const instances = new Map(); // id -> instance row
  const beatInterval = new Map(); // id -> ms between its last two heartbeats
  const agents = new Map(); // id -> agent with workers
  // A brain may have tens of thousands of agents: they are sorted, and the
  // pickers built, when the list is loaded (`setAgents`), not at each render;
  // the overview's table shows the first AGENTS_SHOWN its filter matches.
  const AGENTS_SHOWN = 100;
  const collator = new Intl.Collator();
  let agentOrder = []; // the agents by project, then name
  const agentText = new Map(); // id -> what the overview's filter matches (lower case)
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
    const filter = $("agents-filter").value.trim().toLowerCase();
    const list = [];
    let matched = 0;
    let connected = 0;
    let workersTotal = 0;
    for (const agent of agentOrder) {
      for (const worker of agent.workers || []) {
        workersTotal += 1;
        if (worker.connected) connected += 1;
      }
      if (filter && !agentText.get(String(agent.id)).includes(filter)) continue;
      matched += 1;
      if (list.length < AGENTS_SHOWN) list.push(agent);
    }
    const rows = [];
    for (const agent of list) {
      const workers = [...(agent.workers || [])].sort(
        (a, b) =>
          Number(b.connected) - Number(a.connected) ||
          collator.compare(String(a.worker_id), String(b.worker_id)),
      );
      const live = workers.filter((w) => w.connected).length;
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
              { class: "nowrap", title: worker.worker_id },
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
    $("agents-empty").hidden = agents.size > 0;
    $("agents-hint").textContent = agentsHint(agents.size, matched, list.length, filter);
    $("kpi-workers").textContent = fmtInt(connected);
    $("kpi-workers-of").textContent = `of ${fmtInt(workersTotal)}`;
  }

  function agentsHint(total, matched, shown, filter) {
    if (!total) return "";
    const all = `${fmtInt(total)} agent${total === 1 ? "" : "s"}`;
    if (!filter) {
      return shown < total ? `${all}, the first ${fmtInt(shown)} shown: filter to find others` : all;
    }
    if (!matched) return `none of ${all} matches`;
    if (shown < matched) return `${fmtInt(matched)} of ${all} match, the first ${fmtInt(shown)} shown`;
    return `${fmtInt(matched)} of ${all} match`;
  }
  $("agents-filter").addEventListener("input", () => mark("agents"));

  // An agent picker may hold thousands of options, and Chromium takes tens of
  // microseconds to make each, and some to read one: what each picker was
  // given last is remembered here. The same agents in the same order (a
  // worker came or went): only the labels that changed are set. Otherwise
  // options of agents that stay are kept, those of agents gone removed, new
  // ones put in place; a picker mostly new (the first fill), or whose agents
  // were reordered, is made anew at once.
  const optionsGiven = new WeakMap(); // select -> { values, shown: value -> label and state }
  function syncOptions(select, items) {
    const options = select.options;
    const shown = ([, text, disabled]) => `${text}\u0000${Boolean(disabled)}`;
    const given = optionsGiven.get(select) ?? { values: [], shown: new Map() };
    optionsGiven.set(select, given);
    const values = items.map(([value]) => value);
    const same =
      options.length === given.values.length &&
      values.length === given.values.length &&
      values.every((value, i) => value === given.values[i]);
    const option = (item) => {
      const made = new Option(item[1], item[0]);
      made.disabled = Boolean(item[2]);
      return made;
    };
    if (!same) {
      const wanted = new Set(values);
      for (let i = options.length - 1; i >= 0; i -= 1) {
        if (!wanted.has(options[i].value)) options[i].remove();
      }
      let kept = 0; // how many of the options left come in the order `items` has them
      for (const value of values) {
        if (kept < options.length && options[kept].value === value) kept += 1;
      }
      if (kept < options.length || options.length < items.length / 2) {
        const fragment = document.createDocumentFragment();
        for (const item of items) fragment.append(option(item));
        select.replaceChildren(fragment);
        given.shown = new Map(items.map((item) => [item[0], shown(item)]));
        given.values = values;
        return;
      }
      items.forEach((item, i) => {
        if (options[i]?.value !== item[0]) {
          select.insertBefore(option(item), options[i] ?? null);
          given.shown.set(item[0], shown(item));
        }
      });
      given.values = values;
    }
    items.forEach((item, i) => {
      if (given.shown.get(item[0]) === shown(item)) return;
      options[i].text = item[1];
      options[i].disabled = Boolean(item[2]);
      given.shown.set(item[0], shown(item));
    });
  }

  function renderAgentPickers() {
    renderAgentOptions();
    if (route.view === "tasks") renderTaskAgentOptions(); // else when that page opens
  }

  function renderAgentOptions() {
    const select = $("cmd-agent");
    const previous = select.value;
    const list = agentOrder;
    const items = list.map((agent) => {
      const live = (agent.workers || []).filter((w) => w.connected).length;
      const state = agent.revoked ? "revoked" : `${live} live`;
      return [String(agent.id), `${agentLabel(agent.id)} (${state})`, agent.revoked];
    });
    syncOptions(select, items.length ? items : [["", "no agents"]]);
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
    const filtered = Object.entries(feedFilter)
      .filter(([, v]) => v)
      .map(([k, v]) => `${k.replace("_", " ")} ${v}`);
    $("feed-hint").textContent =
      (feedPaused ? `paused${held ? `, ${held} waiting` : ""}` : "newest first") +
      (filtered.length ? ` · only ${filtered.join(", ")}` : "");
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
    pickers: renderAgentPickers,
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

  // What a filter of agents matches (the Agents page's too): project, name, id.
  const agentSearchText = (agent) =>
    `${agent.project ?? ""} / ${agent.name} ${agent.id}`.toLowerCase();

  function putAgent(agent) {
    const id = String(agent.id);
    agents.set(id, agent);
    agentText.set(id, agentSearchText(agent));
  }

  function setAgents(items) {
    agents.clear();
    agentText.clear();
    for (const agent of items) putAgent(agent);
    agentsChanged();
  }

  // After agents came, went or changed: their order, the pickers, the tables.
  function agentsChanged() {
    agentOrder = [...agents.values()].sort(
      (a, b) =>
        collator.compare(String(a.project), String(b.project)) ||
        collator.compare(String(a.name), String(b.name)),
    );
    mark("agents", "pickers", "commands", "feed");
    // What agents offer, and their names, show on these pages too.
    if (route.view === "queues") renderQueues();
    else if (route.view === "workers") renderEngineWorkers();
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
      if (live && !matchesFeedFilter(item)) continue; // the API filtered the others
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

  // The whole agent list is read at load and at each slow poll (refreshAll).
  // A message about a worker the page knows updates it in place; one about a
  // worker or agent it does not know has that agent read, alone: a brain may
  // have thousands, and reading them all at each message cost the brain about
  // 0.2 s of CPU per open page with 5,000 agents. Many unknown at once (a
  // fleet starting) are read as the whole list, which is cheaper then.
  const AGENT_READS = 20;
  const agentsToRead = new Set();
  let agentsTimer = 0;
  let provisioningTimer = 0;
  function readAgentSoon(agentId) {
    agentsToRead.add(String(agentId));
    clearTimeout(agentsTimer);
    agentsTimer = setTimeout(readAgents, 400);
  }

  async function readAgents() {
    const ids = [...agentsToRead];
    agentsToRead.clear();
    if (ids.length > AGENT_READS) {
      api("GET", "/api/v1/agents")
        .then((data) => setAgents(data.items || []))
        .catch(() => {});
      return;
    }
    const read = await Promise.allSettled(
      ids.map((id) => api("GET", `/api/v1/agents/${encodeURIComponent(id)}`)),
    );
    read.forEach((outcome, i) => {
      if (outcome.status === "fulfilled") putAgent(outcome.value);
      else if (outcome.reason?.status === 404) {
        agents.delete(ids[i]); // gone, or no longer this user's
        agentText.delete(ids[i]);
      }
    });
    agentsChanged();
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
      mark("agents", "pickers");
    } else if (msg.agent_id) {
      readAgentSoon(msg.agent_id); // a new worker (its role, versions) or a new agent
    }
    // The Projects and Agents pages show who is connected too: they read theirs again.
    if (PROVISIONING_VIEWS.has(route.view)) {
      clearTimeout(provisioningTimer);
      provisioningTimer = setTimeout(() => window.z4jProvisioning?.refresh(route.view), 400);
    }
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
        onStoredEvents(msg);
        break;
      }
      case "command":
        upsertCommand(msg.command, { flash: true });
        onCommandChange(msg.command);
        break;
      case "agent":
        onAgentMessage(msg);
        break;
      case "opamp_agent":
        onOpampAgentMessage(msg);
        break;
      case "opamp_rollout":
        onRolloutMessage(msg);
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
      loadFeed(),
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
      refreshView(); // what changed while the socket was away
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

  // -- the events list's filters: one task, an engine, a task name -----------------------------

  const feedFilter = { task_id: "", engine: "", task_name: "" };
  const FEED_FILTER_INPUTS = { task_id: "ff-task", engine: "ff-engine", task_name: "ff-name" };
  let feedGen = 0; // bumped when the filter changes: older answers are dropped

  function feedFiltered() {
    return Object.values(feedFilter).some(Boolean);
  }

  // The API's own test (api.py's /events filters), for live samples.
  function matchesFeedFilter(event) {
    if (!feedFiltered()) return true;
    let body = event.body;
    if (typeof body === "string") {
      try {
        body = JSON.parse(body);
      } catch {
        return false;
      }
    }
    if (!body || typeof body !== "object") return false;
    if (feedFilter.task_id && body.task_id !== feedFilter.task_id) return false;
    if (feedFilter.engine && body.engine !== feedFilter.engine) return false;
    const name = body.data && typeof body.data === "object" ? body.data.task_name : undefined;
    if (feedFilter.task_name && name !== feedFilter.task_name) return false;
    return true;
  }

  function loadFeed() {
    const gen = feedGen;
    const params = new URLSearchParams({ limit: "50" });
    for (const [key, value] of Object.entries(feedFilter)) if (value) params.set(key, value);
    return api("GET", `/api/v1/events?${params}`).then((data) => {
      if (gen === feedGen) addEvents(data.items || [], { live: false });
    });
  }

  function applyFeedFilter() {
    const next = {};
    for (const [key, id] of Object.entries(FEED_FILTER_INPUTS)) next[key] = $(id).value.trim();
    if (Object.keys(next).every((key) => next[key] === feedFilter[key])) return;
    Object.assign(feedFilter, next);
    feedGen += 1;
    feed.length = 0;
    feedIds.clear();
    pendingFeed.length = 0;
    mark("feed");
    loadFeed().catch(() => {});
  }

  // A live message carries a sample of what was stored: under a filter, the
  // list is read again (at most once a second) so that nothing is missed.
  const reloadFilteredFeed = throttle(() => {
    if (feedFiltered() && !feedPaused) loadFeed().catch(() => {});
  }, 1000);

  let feedFilterTimer = 0;
  $("feed-filters").addEventListener("input", () => {
    clearTimeout(feedFilterTimer);
    feedFilterTimer = setTimeout(applyFeedFilter, 300);
  });
  $("feed-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(feedFilterTimer);
    applyFeedFilter();
  });
  $("ff-clear").addEventListener("click", () => {
    for (const id of Object.values(FEED_FILTER_INPUTS)) $(id).value = "";
    clearTimeout(feedFilterTimer);
    applyFeedFilter();
  });

  // -- pages: #/ (overview), #/tasks, #/tasks/<engine>/<task id>, #/queues, #/workers, #/schedules,
  // #/fleet, #/fleet/<instance uid>, #/rollouts, #/rollouts/<id>

  const VIEWS = [
    "overview",
    "tasks",
    "task",
    "queues",
    "workers",
    "schedules",
    "fleet",
    "opamp-agent",
    "rollouts",
    "dead-letters",
    "audit",
    "projects",
    "agents",
    "users",
    "tokens",
    "search", // search.js fills it
    "regions", // regions.js fills it
  ];
  let route = { view: "overview" };
  // #/projects and #/agents: provisioning.js, which app.js lends its helpers to.
  const PROVISIONING_VIEWS = new Set(["projects", "agents"]);

  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [pathPart, queryPart = ""] = raw.split("?");
    let parts;
    try {
      parts = pathPart.split("/").filter(Boolean).map(decodeURIComponent);
    } catch {
      parts = [];
    }
    if (parts[0] === "tasks" && parts.length >= 3) {
      const project = new URLSearchParams(queryPart).get("project");
      return { view: "task", engine: parts[1], taskId: parts.slice(2).join("/"), project };
    }
    if (parts[0] === "tasks") return { view: "tasks" };
    if (parts[0] === "queues") return { view: "queues" };
    if (parts[0] === "workers") return { view: "workers" };
    if (parts[0] === "schedules") return { view: "schedules" };
    if (parts[0] === "fleet" && parts[1]) {
      const project = new URLSearchParams(queryPart).get("project");
      return { view: "opamp-agent", uid: parts[1].toLowerCase(), project };
    }
    if (parts[0] === "fleet") return { view: "fleet" };
    if (parts[0] === "rollouts") return { view: "rollouts", rolloutId: parts[1] ?? null };
    if (parts[0] === "projects" || parts[0] === "agents") return { view: parts[0] };
    if (parts[0] === "dead-letters") return { view: "dead-letters" };
    if (parts[0] === "audit") return { view: "audit" };
    if (parts[0] === "users" || parts[0] === "tokens") return { view: parts[0] }; // accounts.js
    if (parts[0] === "search") return { view: "search" };
    if (parts[0] === "regions") return { view: "regions" };
    return { view: "overview" };
  }

  function taskHref(engine, taskId, project) {
    const base = `#/tasks/${encodeURIComponent(engine)}/${encodeURIComponent(taskId)}`;
    return project ? `${base}?project=${encodeURIComponent(project)}` : base;
  }

  function taskPath(engine, taskId, action, project) {
    let path = `/api/v1/tasks/${encodeURIComponent(engine)}/${encodeURIComponent(taskId)}`;
    if (action) path += `/${action}`;
    if (project) path += `?project_id=${encodeURIComponent(project)}`;
    return path;
  }

  function showRoute() {
    const previous = route;
    route = parseRoute();
    for (const name of VIEWS) $(`view-${name}`).hidden = name !== route.view;
    const section = { task: "tasks", "opamp-agent": "fleet" }[route.view] ?? route.view;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.view === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (route.view === "tasks") {
      renderTaskAgentOptions();
      loadTasks();
    } else if (route.view === "task") {
      const same =
        previous.view === "task" &&
        previous.engine === route.engine &&
        previous.taskId === route.taskId &&
        previous.project === route.project;
      if (!same) openTask();
    } else if (route.view === "queues") loadQueues();
    else if (route.view === "workers") {
      loadEngineWorkers();
      loadRegistry();
    }
    else if (route.view === "schedules") loadSchedules();
    else if (route.view === "fleet") loadFleet();
    else if (route.view === "opamp-agent") {
      const same =
        previous.view === "opamp-agent" &&
        previous.uid === route.uid &&
        previous.project === route.project;
      if (!same) openOpampAgent();
    } else if (route.view === "rollouts") openRollouts();
    else if (route.view === "dead-letters") loadBufferDeadLetters();
    else if (route.view === "audit") loadAudit();
    else if (PROVISIONING_VIEWS.has(route.view)) window.z4jProvisioning?.open(route.view);
    else if (route.view === "users" || route.view === "tokens") window.z4jAccounts?.show(route.view);
    else mark("instances", "agents", "feed", "kinds", "commands", "kpis", "charts");
    if (previous.view !== route.view || route.view === "task") window.scrollTo(0, 0);
  }

  window.addEventListener("hashchange", showRoute);

  // The page shown, read again from the API (after a reconnect, and slowly under the socket).
  function refreshView() {
    if (route.view === "tasks") loadTasks();
    else if (route.view === "task") loadTask();
    else if (route.view === "queues") loadQueues();
    else if (route.view === "workers") {
      loadEngineWorkers();
      loadRegistry();
    }
    else if (route.view === "schedules") loadSchedules();
    else if (route.view === "fleet") loadFleet();
    else if (route.view === "opamp-agent") loadOpampAgent();
    else if (route.view === "rollouts") loadRollouts();
    else if (route.view === "dead-letters") loadBufferDeadLetters();
    else if (route.view === "audit") loadAudit();
    else if (PROVISIONING_VIEWS.has(route.view)) window.z4jProvisioning?.refresh(route.view);
  }

  // fn at most once per `ms`, the last call never lost.
  function throttle(fn, ms) {
    let last = 0;
    let timer = 0;
    return () => {
      if (timer) return;
      timer = setTimeout(
        () => {
          timer = 0;
          last = Date.now();
          fn();
        },
        Math.max(0, last + ms - Date.now()),
      );
    };
  }

  const refreshTasksSoon = throttle(() => route.view === "tasks" && loadTasks(), 1000);
  const refreshTaskSoon = throttle(() => route.view === "task" && loadTask(), 1000);
  const refreshSchedulesSoon = throttle(() => route.view === "schedules" && loadSchedules(), 1000);

  // An ``events`` message: task events change the projection the pages show.
  function onStoredEvents(msg) {
    if (feedFiltered()) reloadFilteredFeed();
    const seen = Object.keys(msg.kinds || {});
    if (!msg.kinds && Array.isArray(msg.sample)) seen.push(...msg.sample.map((e) => e.kind));
    if (route.view === "schedules" && seen.some((kind) => String(kind).startsWith("schedule.")))
      refreshSchedulesSoon();
    if (!seen.some((kind) => String(kind).startsWith("task."))) return;
    if (route.view === "tasks") refreshTasksSoon();
    else if (route.view === "task") refreshTaskSoon();
  }

  const newTaskOf = (rec) => {
    const result = rec && rec.result && typeof rec.result === "object" ? rec.result : {};
    const id = result.new_task_id ?? result.task_id;
    return typeof id === "string" && id ? id : null;
  };

  function onCommandChange(rec) {
    if (rec && controlSent && String(rec.id) === controlSent.id) showControlState(rec);
    onScheduleCommand(rec);
    if (route.view !== "task" || !rec) return;
    const id = route.taskId;
    const named = [rec.target && rec.target.task_id, rec.parameters && rec.parameters.task_id];
    if (named.includes(id) || newTaskOf(rec) === id) refreshTaskSoon();
  }

  function showText(id, text) {
    const box = $(id);
    box.replaceChildren(text || "");
    box.hidden = !text;
  }

  const TASK_STATES = ["received", "started", "retried", "succeeded", "failed", "revoked"];
  const TASK_STATE_CLASS = {
    received: "",
    started: "info live",
    retried: "warn",
    succeeded: "ok",
    failed: "bad",
    revoked: "",
  };

  function statePill(state) {
    return el("span", {
      class: `pill ${TASK_STATE_CLASS[state] ?? ""}`,
      dataset: { state: state ?? "" },
      text: state || "unknown",
    });
  }

  // -- the tasks page -----------------------------------------------------------------------------

  const TASKS_PAGE = 50;
  const TASKS_MAX_PAGE = 500; // the API's largest page
  const BULK_MAX = 100; // tasks one bulk retry sends, at most
  const TASK_FILTER_INPUTS = {
    engine: "tf-engine",
    queue: "tf-queue",
    name: "tf-name",
    agent_id: "tf-agent",
    q: "tf-q",
  };
  // query: the filter the rows were read with (a change of it starts over at one page)
  const taskList = {
    state: "",
    items: [],
    cursor: null,
    counts: null,
    exact: true, // false: counted over the newest matches only, each a lower bound
    gen: 0,
    query: null,
  };
  const enginesSeen = new Set();

  function taskQuery() {
    const params = new URLSearchParams();
    if (taskList.state) params.set("state", taskList.state);
    for (const [name, id] of Object.entries(TASK_FILTER_INPUTS)) {
      const value = $(id).value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  const taskKey = (t) => `${t.project_id}|${t.engine}|${t.task_id}`;

  function matching(counts, state) {
    if (!counts) return null;
    if (state) return Number(counts[state]) || 0;
    return TASK_STATES.reduce((sum, s) => sum + (Number(counts[s]) || 0), 0);
  }

  // The list again, as filtered now; `fresh` starts over at one page, else
  // as many rows as are shown are read again (a live refresh keeps "more").
  async function loadTasks({ fresh = false } = {}) {
    const gen = ++taskList.gen;
    const params = taskQuery();
    const query = params.toString();
    if (query !== taskList.query) fresh = true;
    taskList.query = query;
    const rows = fresh ? TASKS_PAGE : Math.max(TASKS_PAGE, taskList.items.length);
    params.set("limit", String(Math.min(TASKS_MAX_PAGE, rows)));
    try {
      const data = await api("GET", `/api/v1/tasks?${params}`);
      if (gen !== taskList.gen) return;
      taskList.items = data.items || [];
      taskList.cursor = data.next_cursor ?? null;
      taskList.counts = data.counts || null;
      taskList.exact = data.counts_exact !== false;
      showText("tasks-error", "");
    } catch (error) {
      if (gen !== taskList.gen || error.status === 401) return;
      showText("tasks-error", error.message);
    }
    renderTasks();
  }

  async function moreTasks() {
    if (!taskList.cursor) return;
    const gen = taskList.gen;
    const params = taskQuery();
    params.set("limit", String(TASKS_PAGE));
    params.set("cursor", taskList.cursor);
    const button = $("tasks-more");
    button.disabled = true;
    try {
      const data = await api("GET", `/api/v1/tasks?${params}`);
      if (gen !== taskList.gen) return; // the filter changed meanwhile
      const known = new Set(taskList.items.map(taskKey));
      for (const t of data.items || []) if (!known.has(taskKey(t))) taskList.items.push(t);
      taskList.cursor = data.next_cursor ?? null;
      taskList.counts = data.counts || taskList.counts;
    } catch (error) {
      if (error.status !== 401) showText("tasks-error", error.message);
    } finally {
      button.disabled = false;
    }
    renderTasks();
  }

  function renderTaskTabs() {
    const counts = taskList.counts;
    $("state-tabs").replaceChildren(
      ...["", ...TASK_STATES].map((state) =>
        el(
          "button",
          {
            type: "button",
            role: "tab",
            class: "tab",
            dataset: { state },
            "aria-selected": String(taskList.state === state),
            onclick: () => {
              if (taskList.state === state) return;
              taskList.state = state;
              hideBulk();
              renderTaskTabs();
              loadTasks({ fresh: true });
            },
          },
          state || "all",
          el("span", { class: "count", text: counts ? countText(matching(counts, state)) : "–" }),
        ),
      ),
    );
  }

  function countText(n) {
    return taskList.exact ? fmtInt(n) : `${fmtInt(n)}+`;
  }

  function renderTasks() {
    renderTaskTabs();
    const now = serverNow();
    const body = $("tasks-table").tBodies[0];
    body.replaceChildren(
      ...taskList.items.map((t) => {
        enginesSeen.add(t.engine);
        const last = parseTime(t.last_event_at);
        const href = taskHref(t.engine, t.task_id, t.project_id);
        return el(
          "tr",
          {
            class: "clickable",
            dataset: { engine: t.engine, taskId: t.task_id, state: t.state },
            onclick: (event) => {
              if (!event.target.closest("a")) location.hash = href;
            },
          },
          el("td", null, statePill(t.state)),
          el(
            "td",
            { class: "trunc", title: t.name || "" },
            el("a", { class: "task-link", href, text: t.name || "(no name reported)" }),
          ),
          el("td", null, el("span", { class: "tag", text: t.engine })),
          el("td", { class: "mono trunc", title: t.task_id, text: t.task_id }),
          el("td", { text: t.queue || "–" }),
          el("td", { class: "num", text: fmtInt(t.attempts) }),
          el("td", { class: "mono secondary trunc", title: t.worker || "", text: t.worker || "–" }),
          el("td", {
            class: "num",
            title: t.last_event_at ? `${fmtWhen(last)} (${t.last_event_at})` : "",
            dataset: { ago: last ?? "" },
            text: ago(last, now),
          }),
          el("td", { class: "num", text: span(t.runtime_ms) }),
        );
      }),
    );
    $("tasks-empty").hidden = taskList.items.length > 0;
    $("tasks-more").hidden = !taskList.cursor;
    const total = matching(taskList.counts, taskList.state);
    $("tasks-hint").textContent =
      total == null
        ? "newest first"
        : `${fmtInt(taskList.items.length)} of ${countText(total)} shown, newest first`;
    renderEngineOptions();
  }

  function renderEngineOptions() {
    const list = $("tf-engines");
    const engines = [...enginesSeen].sort();
    if (list.children.length === engines.length) return;
    list.replaceChildren(...engines.map((engine) => el("option", { value: engine })));
  }

  function renderTaskAgentOptions() {
    const select = $("tf-agent");
    const previous = select.value;
    const items = agentOrder.map((agent) => [String(agent.id), agentLabel(agent.id)]);
    syncOptions(select, [["", "any agent"], ...items]);
    if (previous && agents.has(previous)) select.value = previous;
    else if (previous) {
      select.append(el("option", { value: previous, text: shortId(previous) }));
      select.value = previous;
    }
  }

  // Typing reloads the list once it pauses, and only when the filter changed
  // (a field's "change" as it loses focus is no change).
  let taskFilterTimer = 0;
  function taskFiltersChanged() {
    clearTimeout(taskFilterTimer);
    taskFilterTimer = setTimeout(() => {
      if (taskQuery().toString() === taskList.query) return;
      hideBulk();
      loadTasks({ fresh: true });
    }, 250);
  }
  $("task-filters").addEventListener("input", taskFiltersChanged);
  $("task-filters").addEventListener("change", taskFiltersChanged);
  $("task-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(taskFilterTimer);
    hideBulk();
    loadTasks({ fresh: true });
  });
  $("tf-clear").addEventListener("click", () => {
    for (const id of Object.values(TASK_FILTER_INPUTS)) $(id).value = "";
    taskFiltersChanged();
  });
  $("tasks-more").addEventListener("click", moreTasks);

  // -- bulk retry: the tasks the filter matches, newest first, at most BULK_MAX ------------------
  //
  // Two steps, both the brain's: asked without a count, it answers 409
  // confirm with how many tasks it would retry; the page shows that number,
  // and on confirmation sends it back. The brain then sends one bulk_retry
  // per agent where the agent offers it (celery), else one retry_task per
  // task, and lists the tasks it could not retry.

  let bulkFilter = null;

  function hideBulk() {
    bulkFilter = null;
    $("bulk-panel").hidden = true;
  }

  function bulkBody(extra) {
    return { filter: Object.fromEntries(taskQuery()), max: BULK_MAX, ...extra };
  }

  $("bulk-retry").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    showText("bulk-result", "");
    showText("tasks-error", "");
    button.disabled = true;
    try {
      let n = null;
      try {
        await api("POST", "/api/v1/tasks/retry", bulkBody({ confirm_count: -1 }));
      } catch (error) {
        if (error.code !== "confirm") throw error;
        n = Number(error.data && error.data.count) || 0;
      }
      if (!n) {
        hideBulk();
        showText("bulk-result", "No task matches this filter: there is nothing to retry.");
        return;
      }
      const data = await api("GET", `/api/v1/tasks?${taskQuery()}&limit=1`);
      const total = Math.max(matching(data.counts, taskList.state) ?? 0, n);
      const tasks = `task${n === 1 ? "" : "s"}`;
      bulkFilter = bulkBody({ confirm_count: n });
      $("bulk-panel").dataset.count = String(n);
      $("bulk-text").replaceChildren(
        el("b", { text: `Retry ${fmtInt(n)} ${tasks}?` }),
        " ",
        total > n
          ? `${fmtInt(total)} tasks match this filter; one bulk retry sends at most ${BULK_MAX}, ` +
              `so only the newest ${fmtInt(n)} will be retried.`
          : `${n === 1 ? "This is the task" : `These are the ${fmtInt(n)} tasks`} that match this filter.`,
        " The brain sends them to their agents, as one bulk_retry where the agent offers it, " +
          "else one retry_task each.",
      );
      $("bulk-confirm").textContent = `Retry ${fmtInt(n)} ${tasks}`;
      $("bulk-panel").hidden = false;
      $("bulk-confirm").focus();
    } catch (error) {
      if (error.status !== 401) showText("tasks-error", error.message);
    } finally {
      button.disabled = false;
    }
  });

  $("bulk-cancel").addEventListener("click", hideBulk);

  $("bulk-confirm").addEventListener("click", async () => {
    const body = bulkFilter;
    hideBulk();
    if (!body) return;
    const box = $("bulk-result");
    const button = $("bulk-retry");
    button.disabled = true;
    box.dataset.state = "running";
    showText("bulk-result", "Retrying…");
    let sent = 0;
    let skipped = [];
    let failure = null;
    try {
      const done = await api("POST", "/api/v1/tasks/retry", body);
      for (const rec of done.commands || []) upsertCommand(rec, { flash: true });
      sent = body.confirm_count - (done.skipped || []).length;
      skipped = done.skipped || [];
    } catch (error) {
      if (error.status === 401) return;
      failure = error;
    }
    if (failure) {
      box.replaceChildren(
        el("b", { text: "Bulk retry refused" }),
        `: ${failure.code === "confirm" ? "the matching tasks changed; ask again" : failure.message}`,
      );
    } else {
      const n = body.confirm_count;
      box.replaceChildren(
        el("b", { text: `Retry sent for ${sent} of ${n} task${n === 1 ? "" : "s"}` }),
        skipped.length ? `; ${skipped.length} skipped:` : ".",
      );
      if (skipped.length) {
        box.append(
          el(
            "ul",
            { class: "failures" },
            skipped.map((s) =>
              el("li", null, el("span", { class: "mono", text: s.task_id }), `: ${s.reason}`),
            ),
          ),
        );
      }
    }
    box.dataset.state = "done";
    box.dataset.sent = String(sent);
    box.dataset.failed = String(skipped.length + (failure ? 1 : 0));
    box.hidden = false;
    button.disabled = false;
    loadTasks();
  });

  // -- one task -------------------------------------------------------------------------------

  const taskDetail = { task: null, gen: 0, busy: false };

  function fmtWhen(ms) {
    if (ms == null) return "–";
    const d = new Date(ms);
    const date = [d.getFullYear(), d.getMonth() + 1, d.getDate()]
      .map((n, i) => String(n).padStart(i ? 2 : 4, "0"))
      .join("-");
    return `${date} ${clock(ms)}`;
  }

  // Times in a task are ISO text; inside its timeline they are epoch seconds.
  function anyTime(value) {
    if (typeof value === "number" && Number.isFinite(value)) return value * 1000;
    return parseTime(value);
  }

  function when(value) {
    const ms = anyTime(value);
    if (ms == null) return el("span", { class: "muted", text: "–" });
    return el("span", { title: typeof value === "string" ? value : "", text: fmtWhen(ms) });
  }

  const json = (value) => JSON.stringify(value, null, 2);

  function openTask() {
    taskDetail.task = null;
    taskDetail.gen += 1;
    $("retry-form").hidden = true;
    showText("task-action-result", "");
    showText("task-action-error", "");
    $("task-title").textContent = route.taskId;
    $("task-state").replaceChildren();
    $("task-actions").replaceChildren();
    $("task-body").replaceChildren(el("div", { class: "empty", text: "Loading…" }));
    loadTask();
  }

  async function loadTask() {
    const { engine, taskId, project } = route;
    const gen = ++taskDetail.gen;
    try {
      const task = await api("GET", taskPath(engine, taskId, "", project));
      if (gen !== taskDetail.gen || route.view !== "task") return;
      taskDetail.task = task;
      enginesSeen.add(task.engine);
      renderTask();
    } catch (error) {
      if (gen !== taskDetail.gen || error.status === 401) return;
      if (taskDetail.task) {
        showText("task-action-error", error.message);
        return;
      }
      $("task-body").replaceChildren(
        el("div", {
          class: "empty",
          text: error.status === 404 ? `No ${engine} task ${taskId} is known here.` : error.message,
        }),
      );
    }
  }

  // replaceChildren, skipping what is absent (the DOM's would write "null").
  function fill(node, ...children) {
    node.replaceChildren(...children.flat(Infinity).filter((c) => c != null && c !== false));
  }

  function block(title, id, ...children) {
    return el("section", { class: "block", id }, el("h3", { text: title }), ...children);
  }

  function pre(value, id, cls) {
    return el("pre", { id, class: `code ${cls ?? ""}`, text: value });
  }

  function taskLink(engine, taskId, project, cls) {
    return el("a", {
      class: `mono ${cls ?? ""}`,
      href: taskHref(engine, taskId, project),
      text: taskId,
    });
  }

  function renderTask() {
    const t = taskDetail.task;
    const project = t.project_id;
    $("task-title").textContent = t.name || "(no name reported)";
    $("task-state").replaceChildren(statePill(t.state));
    const actions = new Set(t.actions || []);
    fill(
      $("task-actions"),
      actions.has("retry")
        ? el("button", {
            id: "task-retry",
            class: "btn primary",
            type: "button",
            text: "Retry",
            title: "Send the task again, as it was",
            disabled: taskDetail.busy,
            onclick: () => taskAction("retry"),
          })
        : null,
      actions.has("retry")
        ? el("button", {
            id: "task-retry-inputs",
            class: "btn",
            type: "button",
            text: "Retry with different inputs",
            disabled: taskDetail.busy,
            onclick: () => openRetryForm(),
          })
        : null,
      actions.has("cancel")
        ? el("button", {
            id: "task-cancel",
            class: "btn danger",
            type: "button",
            text: "Cancel",
            title: "Revoke the task",
            disabled: taskDetail.busy,
            onclick: () => taskAction("cancel"),
          })
        : null,
      actions.size
        ? null
        : el("span", { class: "muted", text: "no worker of its agent offers retry or cancel" }),
      el("button", {
        id: "task-events",
        class: "btn",
        type: "button",
        text: "Events",
        title: "The stored events of this task, on the overview",
        onclick: () => showTaskEvents(t),
      }),
    );

    const facts = [
      ["engine", "Engine", el("span", { class: "tag", text: t.engine })],
      ["task_id", "Task id", el("span", { class: "mono", text: t.task_id })],
      ["queue", "Queue", t.queue || "–"],
      ["state", "State", t.state],
      ["attempts", "Attempts", fmtInt(t.attempts)],
      ["worker", "Worker", el("span", { class: "mono", text: t.worker || "–" })],
      ["agent", "Agent", t.agent_id ? agentLabel(t.agent_id) : "–"],
      ["received_at", "Received", when(t.received_at)],
      ["started_at", "Started", when(t.started_at)],
      ["finished_at", "Finished", when(t.finished_at)],
      ["last_event_at", "Last event", when(t.last_event_at)],
      ["runtime", "Runtime", span(t.runtime_ms)],
    ];
    if (t.priority != null) facts.push(["priority", "Priority", preview(t.priority)]);
    if (t.tags != null) facts.push(["tags", "Tags", preview(t.tags)]);
    const summary = el(
      "dl",
      { class: "facts", id: "task-summary" },
      facts.map(([key, label, value]) => [
        el("dt", { text: label }),
        el("dd", { dataset: { field: key } }, value),
      ]),
    );

    const timeline = el(
      "table",
      { id: "task-timeline" },
      el(
        "thead",
        null,
        el(
          "tr",
          null,
          ["#", "State", "Received", "Started", "Finished", "Worker", "Runtime", "Error"].map(
            (h, i) => el("th", { class: i === 0 || i === 6 ? "num" : null, text: h }),
          ),
        ),
      ),
      el(
        "tbody",
        null,
        (t.timeline || []).map((a) =>
          el(
            "tr",
            { dataset: { attempt: a.attempt, state: a.state ?? "" } },
            el("td", { class: "num", text: a.attempt }),
            el("td", null, a.state ? statePill(a.state) : "–"),
            el("td", null, when(a.received_at)),
            el("td", null, when(a.started_at)),
            el("td", null, when(a.finished_at)),
            el("td", { class: "mono secondary", text: a.worker || "–" }),
            el("td", { class: "num", text: span(a.runtime_ms) }),
            el("td", {
              class: "trunc",
              title: [a.exception, a.message].filter(Boolean).join(": "),
              text: [a.exception, a.message].filter(Boolean).join(": ") || "",
            }),
          ),
        ),
      ),
    );

    const inputsKnown = t.args != null || t.kwargs != null;
    const inputs = inputsKnown
      ? el(
          "div",
          { class: "two" },
          el(
            "div",
            null,
            el("div", { class: "sub", text: "args" }),
            pre(json(t.args ?? []), "task-args"),
          ),
          el(
            "div",
            null,
            el("div", { class: "sub", text: "kwargs" }),
            pre(json(t.kwargs ?? {}), "task-kwargs"),
          ),
        )
      : el("p", { class: "muted", id: "task-args", text: "The engine did not report its inputs." });

    const failed = t.exception || t.message || t.traceback;
    const exception = failed
      ? el(
          "div",
          { id: "task-exception" },
          el(
            "p",
            { class: "exc" },
            el("b", { class: "exc-type", text: t.exception || "Error" }),
            t.message ? [": ", el("span", { class: "exc-message", text: t.message })] : null,
          ),
          t.traceback ? pre(t.traceback, "task-traceback", "traceback") : null,
        )
      : null;

    const commands = t.commands || [];
    const retryOf = commands
      .filter(
        (c) => newTaskOf(c) === t.task_id && c.parameters && c.parameters.task_id !== t.task_id,
      )
      .map((c) => c.parameters.task_id);
    const retriedAs = commands
      .filter((c) => c.action === "retry_task" && newTaskOf(c) && newTaskOf(c) !== t.task_id)
      .map(newTaskOf);
    const lineage = [
      ["parent", "Parent", t.parent_id ? [taskLink(t.engine, t.parent_id, project)] : []],
      [
        "root",
        "Root",
        t.root_id && t.root_id !== t.task_id ? [taskLink(t.engine, t.root_id, project)] : [],
      ],
      ["retry_of", "Retry of", retryOf.map((id) => taskLink(t.engine, id, project))],
      ["retried_as", "Retried as", retriedAs.map((id) => taskLink(t.engine, id, project))],
    ].filter(([, , links]) => links.length);

    const commandRows = commands.map((c) => {
      const created = parseTime(c.created_at);
      const newId = newTaskOf(c);
      const engine =
        (c.parameters && c.parameters.engine) || (c.target && c.target.engine) || t.engine;
      const params = { ...(c.parameters || {}) };
      delete params.engine;
      delete params.task_id;
      delete params.task_name;
      let outcome;
      if (c.error) outcome = el("span", { class: "mono bad-text", text: preview(c.error, 160) });
      else if (newId && newId !== t.task_id)
        outcome = el(
          "span",
          null,
          "new task ",
          el("a", {
            class: "mono new-task-link",
            href: taskHref(engine, newId, project),
            text: newId,
          }),
        );
      else if (c.result != null)
        outcome = el("span", {
          class: "mono",
          title: preview(c.result, 2000),
          text: preview(c.result, 120),
        });
      return el(
        "tr",
        { dataset: { id: c.id, action: c.action, state: c.state } },
        el("td", { class: "mono", title: c.id, text: shortId(c.id) }),
        el("td", { class: "mono", text: c.action }),
        el(
          "td",
          null,
          el("span", {
            class: `pill ${STATE_CLASS[c.state] ?? ""}`,
            dataset: { state: c.state },
            text: c.state,
          }),
        ),
        el("td", {
          class: "num",
          title: c.created_at || "",
          dataset: { ago: created ?? "" },
          text: ago(created),
        }),
        el("td", {
          class: "mono trunc params",
          title: preview(params, 2000),
          text: Object.keys(params).length ? preview(params, 160) : "",
        }),
        el("td", { class: "trunc" }, outcome),
      );
    });

    fill(
      $("task-body"),
      block("Summary", "task-summary-block", summary),
      block(
        "Attempts",
        "task-attempts",
        (t.timeline || []).length ? timeline : el("p", { class: "muted", text: "No attempt yet." }),
      ),
      block("Inputs", "task-inputs", inputs),
      t.result !== null && t.result !== undefined
        ? block("Result", "task-result-block", pre(json(t.result), "task-result"))
        : null,
      exception ? block("Exception", "task-exception-block", exception) : null,
      lineage.length
        ? block(
            "Lineage",
            "task-lineage",
            el(
              "dl",
              { class: "facts" },
              lineage.map(([key, label, links]) => [
                el("dt", { text: label }),
                el(
                  "dd",
                  { dataset: { field: key } },
                  links.flatMap((a, i) => (i ? [", ", a] : [a])),
                ),
              ]),
            ),
          )
        : null,
      block(
        "Commands",
        "task-commands-block",
        commands.length
          ? el(
              "table",
              { id: "task-commands" },
              el(
                "thead",
                null,
                el(
                  "tr",
                  null,
                  ["Command", "Action", "State", "Created", "Parameters", "Result"].map((h) =>
                    el("th", { class: h === "Created" ? "num" : null, text: h }),
                  ),
                ),
              ),
              el("tbody", null, commandRows),
            )
          : el("p", {
              class: "muted",
              id: "task-commands",
              text: "No command has named this task.",
            }),
      ),
    );
  }

  function setTaskBusy(busy) {
    taskDetail.busy = busy;
    for (const id of ["task-retry", "task-retry-inputs", "task-cancel", "retry-form-send"]) {
      const button = $(id);
      if (button) button.disabled = busy;
    }
  }

  // Retry (body undefined: as it was; {args, kwargs}: with these inputs) or cancel.
  async function taskAction(action, body) {
    const t = taskDetail.task;
    if (!t || taskDetail.busy) return null;
    showText("task-action-result", "");
    showText("task-action-error", "");
    setTaskBusy(true);
    try {
      const rec = await api("POST", taskPath(t.engine, t.task_id, action, t.project_id), body);
      upsertCommand(rec, { flash: true });
      const what = action === "cancel" ? "Cancel" : body ? "Retry with new inputs" : "Retry";
      showText("task-action-result", `${what} sent as command ${shortId(rec.id)} (${rec.state}).`);
      $("task-action-result").dataset.command = rec.id;
      loadTask();
      return rec;
    } catch (error) {
      if (error.status === 401) return null;
      if (action === "retry" && body === undefined && error.code === "inputs_unknown") {
        openRetryForm({
          args: [],
          kwargs: {},
          why:
            `Retry needs this task's inputs: ${t.engine} sends a task again with its args and ` +
            "kwargs, and this one's were never reported. Give them here to retry it.",
        });
        return null;
      }
      showText("task-action-error", error.message);
      return null;
    } finally {
      setTaskBusy(false);
    }
  }

  function openRetryForm({ args, kwargs, why } = {}) {
    const t = taskDetail.task;
    if (!t) return;
    const known = t.args != null || t.kwargs != null;
    const plain = (v) => v && typeof v === "object" && !Array.isArray(v);
    $("retry-args").value = json(args ?? (Array.isArray(t.args) ? t.args : []));
    $("retry-kwargs").value = json(kwargs ?? (plain(t.kwargs) ? t.kwargs : {}));
    $("retry-form-note").textContent =
      why ||
      (known
        ? "The task is sent again with these inputs instead of its own."
        : "The engine did not report this task's inputs: give its args and kwargs.");
    showText("retry-form-error", "");
    $("retry-form").hidden = false;
    $("retry-args").focus();
  }

  function readJson(id, label, want) {
    const text = $(id).value.trim();
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new Error(`${label} is not valid JSON: ${error.message}`);
    }
    if (want === "list" && !Array.isArray(value))
      throw new Error(`${label} must be a JSON list, like [] or [1, "a"].`);
    if (want === "object" && (!value || typeof value !== "object" || Array.isArray(value)))
      throw new Error(`${label} must be a JSON object, like {} or {"key": 1}.`);
    return value;
  }

  $("retry-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    let args;
    let kwargs;
    try {
      args = readJson("retry-args", "args", "list");
      kwargs = readJson("retry-kwargs", "kwargs", "object");
    } catch (error) {
      showText("retry-form-error", error.message);
      return;
    }
    showText("retry-form-error", "");
    const rec = await taskAction("retry", { args, kwargs });
    if (rec) $("retry-form").hidden = true;
  });
  $("retry-form-cancel").addEventListener("click", () => {
    $("retry-form").hidden = true;
  });

  function showTaskEvents(t) {
    $("ff-task").value = t.task_id;
    $("ff-engine").value = t.engine;
    $("ff-name").value = "";
    applyFeedFilter();
    location.hash = "#/";
    requestAnimationFrame(() => $("feed-card").scrollIntoView({ block: "start" }));
  }

  // -- queues ----------------------------------------------------------------------------------

  const QUEUES_POLL_MS = 5000;
  let queuesLoadedAt = 0;
  let queuesGen = 0;
  let queueItems = [];
  let purging = null; // {engine, queue, agentId, depth} awaiting the operator's yes

  async function loadQueues() {
    const gen = ++queuesGen;
    queuesLoadedAt = Date.now();
    try {
      const data = await api("GET", "/api/v1/queues");
      if (gen !== queuesGen) return;
      queueItems = data.items || [];
      showText("queues-error", "");
      renderQueues();
    } catch (error) {
      if (gen === queuesGen && error.status !== 401) showText("queues-error", error.message);
    }
  }

  function renderQueues() {
    const body = $("queues-table").tBodies[0];
    body.replaceChildren(
      ...queueItems.map((q) => {
        enginesSeen.add(q.engine);
        const depths = q.depths || [];
        const total = depths.length
          ? depths.reduce((sum, d) => sum + (Number(d.depth) || 0), 0)
          : null;
        const agentIds = [...new Set(depths.map((d) => d.agent_id))];
        const listing = q.queue ? deadLetterAgents(q.engine) : []; // a named queue only
        const brokers = [...new Set(depths.map((d) => d.broker_type).filter(Boolean))];
        const down = depths.some((d) => d.broker_connected === false);
        const outcomes = Object.entries(q.outcomes || {})
          .filter(([, n]) => n)
          .map(([state, n]) => `${fmtInt(n)} ${state}`)
          .join(" · ");
        return el(
          "tr",
          { dataset: { engine: q.engine, queue: q.queue } },
          el("td", null, el("span", { class: "tag", text: q.engine })),
          el("td", { class: "mono", text: q.queue || "(none)" }),
          el("td", { class: "num depth", text: total == null ? "–" : fmtInt(total) }),
          el(
            "td",
            { class: "secondary" },
            depths.length
              ? depths.map((d, i) => [
                  i ? el("br") : null,
                  `${agentLabel(d.agent_id)} · ${d.worker_id}: ${fmtInt(d.depth)}`,
                ])
              : "no worker reports its depth",
          ),
          el(
            "td",
            null,
            brokers.join(", ") || "–",
            down ? [" ", el("span", { class: "pill bad", text: "disconnected" })] : null,
          ),
          el("td", { class: "num", text: fmtRate(q.finished_per_minute) }),
          el("td", {
            class: "num",
            text: q.failure_rate == null ? "–" : `${nf1.format(q.failure_rate * 100)} %`,
          }),
          el("td", { class: "secondary", text: outcomes || "–" }),
          el(
            "td",
            { class: "num row-actions" },
            listing.map((agentId) =>
              el("button", {
                class: "btn small dead-letters-open",
                type: "button",
                dataset: { agent: agentId },
                text: listing.length > 1 ? `Dead letters on ${agentLabel(agentId)}` : "Dead letters",
                onclick: () => openDeadLetters(q.engine, q.queue, agentId),
              }),
            ),
            agentIds.map((agentId) =>
              el("button", {
                class: "btn small danger",
                type: "button",
                dataset: { agent: agentId },
                text: agentIds.length > 1 ? `Purge on ${agentLabel(agentId)}` : "Purge",
                onclick: (event) => askPurge(q, agentId, event.currentTarget),
              }),
            ),
          ),
        );
      }),
    );
    $("queues-empty").hidden = queueItems.length > 0;
  }

  function purgePath(engine, queue) {
    return `/api/v1/queues/${encodeURIComponent(engine)}/${encodeURIComponent(queue)}/purge`;
  }

  // Step one: the brain answers 409 "confirm" with the depth it last saw.
  async function askPurge(q, agentId, button) {
    purging = null;
    $("purge-panel").hidden = true;
    showText("purge-result", "");
    showText("queues-error", "");
    button.disabled = true;
    try {
      const rec = await api("POST", purgePath(q.engine, q.queue), { agent_id: agentId });
      // A brain that purged at once (none does today): say so all the same.
      if (rec && rec.id != null) purgeSent(rec);
    } catch (error) {
      if (error.status === 401) return;
      if (error.code !== "confirm") {
        showText("queues-error", error.message);
        return;
      }
      const depth = Number.isInteger(error.data.depth) ? error.data.depth : null;
      purging = { engine: q.engine, queue: q.queue, agentId, depth };
      const where = `${q.engine} queue “${q.queue}” on ${agentLabel(agentId)}`;
      const panel = $("purge-panel");
      panel.dataset.depth = depth == null ? "" : String(depth);
      $("purge-text").replaceChildren(
        el("b", { text: `Purge the ${where}?` }),
        " ",
        depth == null
          ? "Its adapter reports no depth, so say how many messages you expect it to hold."
          : `The brain last saw ${fmtInt(depth)} message${depth === 1 ? "" : "s"} in it.`,
        " They are deleted, not run. The agent measures the queue again and refuses if it does " +
          "not hold the number confirmed here.",
      );
      $("purge-depth-label").hidden = depth != null;
      $("purge-depth").value = "";
      $("purge-confirm").textContent =
        depth == null ? "Purge" : `Purge ${fmtInt(depth)} message${depth === 1 ? "" : "s"}`;
      panel.hidden = false;
      (depth == null ? $("purge-depth") : $("purge-confirm")).focus();
    } finally {
      button.disabled = false;
    }
  }

  function purgeSent(rec) {
    upsertCommand(rec, { flash: true });
    showText("purge-result", `Purge sent as command ${shortId(rec.id)} (${rec.state}).`);
    $("purge-result").dataset.command = rec.id;
  }

  // Step two: the same request, naming the depth the operator confirmed.
  $("purge-confirm").addEventListener("click", async (event) => {
    if (!purging) return;
    let depth = purging.depth;
    if (depth == null) {
      const typed = $("purge-depth").value.trim();
      depth = /^\d+$/.test(typed) ? Number(typed) : null;
      if (depth == null) {
        showText("queues-error", "Give the number of messages, a whole number.");
        return;
      }
    }
    const { engine, queue, agentId } = purging;
    const button = event.currentTarget;
    button.disabled = true;
    showText("queues-error", "");
    try {
      const rec = await api("POST", purgePath(engine, queue), {
        agent_id: agentId,
        confirm_depth: depth,
      });
      purging = null;
      $("purge-panel").hidden = true;
      purgeSent(rec);
      loadQueues();
    } catch (error) {
      if (error.status !== 401) showText("queues-error", error.message);
    } finally {
      button.disabled = false;
    }
  });
  $("purge-cancel").addEventListener("click", () => {
    purging = null;
    $("purge-panel").hidden = true;
  });
  $("queues-refresh").addEventListener("click", loadQueues);

  // -- dead letters: asked of the agent, on demand -----------------------------------------------
  //
  // The brain sends dlq.list to the agent and waits (up to 10 s) for its
  // answer; only agents whose connected workers advertise list_dead_letters
  // for the queue's engine get a button (dramatiq's, in z4j 1.13). Re-queue
  // shows where the agent also advertises requeue_dead_letter.

  let deadLetters = null; // {engine, queue, agentId, items, cursor, actions, gen}
  let deadLettersGen = 0;

  function deadLetterAgents(engine) {
    return [...agents.values()]
      .filter((agent) =>
        (agent.workers || []).some(
          (w) =>
            w.connected &&
            ((w.capabilities && w.capabilities[engine]) || []).includes("list_dead_letters"),
        ),
      )
      .map((agent) => String(agent.id));
  }

  function deadLettersPath(engine, queue, tail = "") {
    const base = `/api/v1/queues/${encodeURIComponent(engine)}/${encodeURIComponent(queue)}`;
    return `${base}/dead-letters${tail}`;
  }

  function openDeadLetters(engine, queue, agentId) {
    deadLetters = { engine, queue, agentId, items: [], cursor: null, actions: [], total: null };
    $("dead-letters-title").textContent = `Dead letters of ${engine} queue “${queue}”`;
    $("dead-letters-card").hidden = false;
    showText("dead-letters-error", "");
    showText("dead-letters-status", "");
    renderDeadLetters();
    loadDeadLetters();
    $("dead-letters-card").scrollIntoView({ block: "nearest" });
  }

  async function loadDeadLetters({ more = false } = {}) {
    if (!deadLetters) return;
    const asked = deadLetters;
    const gen = ++deadLettersGen;
    const params = new URLSearchParams({ agent_id: asked.agentId });
    if (more && asked.cursor) params.set("cursor", asked.cursor);
    const box = $("dead-letters-card");
    box.dataset.state = "asking";
    $("dead-letters-more").disabled = true;
    showText("dead-letters-error", "");
    $("dead-letters-hint").textContent = `asking ${agentLabel(asked.agentId)}… (up to 10 s)`;
    try {
      const data = await api("GET", deadLettersPath(asked.engine, asked.queue, `?${params}`));
      if (gen !== deadLettersGen || deadLetters !== asked) return;
      asked.items = more ? [...asked.items, ...(data.items || [])] : data.items || [];
      asked.cursor = data.next_cursor ?? null;
      asked.actions = data.actions || [];
      asked.total = data.total ?? null;
      box.dataset.state = "listed";
    } catch (error) {
      if (gen !== deadLettersGen || error.status === 401) return;
      box.dataset.state = "failed";
      showText(
        "dead-letters-error",
        error.status === 504 ? `${error.message} (try again in a moment)` : error.message,
      );
    } finally {
      $("dead-letters-more").disabled = false;
    }
    renderDeadLetters();
  }

  function renderDeadLetters() {
    const list = deadLetters;
    if (!list) return;
    const now = serverNow();
    const canRequeue = list.actions.includes("requeue");
    const shown = `${fmtInt(list.items.length)}${list.total == null ? "" : ` of ${fmtInt(list.total)}`}`;
    $("dead-letters-hint").textContent =
      `${shown} listed by ${agentLabel(list.agentId)}, newest first` +
      (canRequeue ? "" : "; its agent offers no re-queue");
    $("dead-letters-table").tBodies[0].replaceChildren(
      ...list.items.map((entry) => {
        const failed = parseTime(entry.failed_at);
        return el(
          "tr",
          { dataset: { taskId: entry.task_id } },
          el("td", { class: "mono trunc", title: entry.task_id, text: entry.task_id }),
          el("td", { class: "mono", text: entry.task_name || "–" }),
          el("td", { text: entry.queue || "–" }),
          el("td", {
            class: "num",
            title: entry.failed_at || "the engine keeps no time",
            dataset: { ago: failed ?? "" },
            text: failed == null ? "–" : ago(failed, now),
          }),
          el("td", { class: "num", text: entry.attempts == null ? "–" : fmtInt(entry.attempts) }),
          el(
            "td",
            { class: "error-excerpt" },
            entry.error_excerpt ? el("pre", { class: "code", text: entry.error_excerpt }) : "–",
          ),
          el(
            "td",
            { class: "num" },
            canRequeue
              ? el("button", {
                  class: "btn small requeue",
                  type: "button",
                  text: "Re-queue",
                  onclick: (event) => requeue(list, entry, event.currentTarget),
                })
              : null,
          ),
        );
      }),
    );
    $("dead-letters-empty").hidden =
      list.items.length > 0 || $("dead-letters-card").dataset.state !== "listed";
    $("dead-letters-more").hidden = !list.cursor;
  }

  async function requeue(list, entry, button) {
    button.disabled = true;
    showText("dead-letters-error", "");
    try {
      const body = { agent_id: list.agentId };
      if (entry.task_name) body.task_name = entry.task_name;
      const rec = await api(
        "POST",
        deadLettersPath(list.engine, list.queue, `/${encodeURIComponent(entry.task_id)}/requeue`),
        body,
      );
      upsertCommand(rec, { flash: true });
      showText(
        "dead-letters-status",
        `Re-queue of ${entry.task_id} sent as command ${shortId(rec.id)} (${rec.state}).`,
      );
      $("dead-letters-status").dataset.command = rec.id;
    } catch (error) {
      if (error.status !== 401) showText("dead-letters-error", error.message);
    } finally {
      button.disabled = false;
    }
  }

  $("dead-letters-more").addEventListener("click", () => loadDeadLetters({ more: true }));
  $("dead-letters-close").addEventListener("click", () => {
    deadLetters = null;
    deadLettersGen++;
    $("dead-letters-card").hidden = true;
  });

  // -- engine workers: the engines' own, and celery's worker controls ----------------------------
  //
  // Each control opens a panel asking what it needs (a restart only asks to
  // be sure), then POSTs /api/v1/engine-workers/<engine>/<worker>/<action>.
  // Celery's controls are broadcasts with no reply: the command completes
  // once sent, whether or not the worker obeyed, and the page says so.

  const WORKERS_POLL_MS = 5000;
  const CONTROLS = {
    restart_worker: {
      label: "Restart pool",
      ask: (w) => `Restart the pool of ${w.worker}? Its running tasks are interrupted.`,
      go: "Restart pool",
      danger: true,
    },
    pool_grow: { label: "Grow pool", ask: (w) => `Grow the pool of ${w.worker} by:`, go: "Grow" },
    pool_shrink: {
      label: "Shrink pool",
      ask: (w) => `Shrink the pool of ${w.worker} by:`,
      go: "Shrink",
    },
    add_consumer: {
      label: "Add consumer",
      ask: (w) => `Have ${w.worker} consume from another queue:`,
      go: "Add consumer",
    },
    cancel_consumer: {
      label: "Cancel consumer",
      ask: (w) => `Have ${w.worker} stop consuming from a queue:`,
      go: "Cancel consumer",
    },
    rate_limit: {
      label: "Rate limit",
      ask: (w) => `Set a task's rate limit on ${w.worker}:`,
      go: "Set rate limit",
    },
  };
  const CONTROL_INPUTS = {
    pool_grow: ["delta"],
    pool_shrink: ["delta"],
    add_consumer: ["queue"],
    cancel_consumer: ["queue"],
    rate_limit: ["task", "rate"],
  };
  let engineWorkers = [];
  let workersWarning = "";
  let workersLoadedAt = 0;
  let workersGen = 0;
  let controlling = null; // {worker, action} awaiting the operator's yes
  let controlSent = null; // {id, label}: the last control sent, followed live

  async function loadEngineWorkers() {
    const gen = ++workersGen;
    workersLoadedAt = Date.now();
    try {
      const data = await api("GET", "/api/v1/engine-workers");
      if (gen !== workersGen) return;
      engineWorkers = data.items || [];
      workersWarning = data.warning || "";
      showText("engine-workers-error", "");
      renderEngineWorkers();
    } catch (error) {
      if (gen === workersGen && error.status !== 401) {
        showText("engine-workers-error", error.message);
      }
    }
  }

  function renderEngineWorkers() {
    const now = serverNow();
    const offered = engineWorkers.some((w) => (w.actions || []).length);
    showText("control-warning", offered ? workersWarning : "");
    $("engine-workers-table").tBodies[0].replaceChildren(
      ...engineWorkers.map((w) => {
        const last = parseTime(w.last_seen);
        const states = Object.entries(w.states || {})
          .filter(([, n]) => n)
          .map(([state, n]) => `${fmtInt(n)} ${state}`)
          .join(" · ");
        return el(
          "tr",
          { dataset: { engine: w.engine, worker: w.worker, agent: w.agent_id ?? "" } },
          el("td", null, el("span", { class: "tag", text: w.engine })),
          el("td", { class: "mono", text: w.worker }),
          el(
            "td",
            { class: "agent-workers" },
            el("div", { class: "agent-name", text: w.agent_id ? agentLabel(w.agent_id) : "–" }),
            (w.agent_workers || []).map((aw) =>
              el(
                "div",
                { class: "secondary", dataset: { workerId: aw.worker_id } },
                el("span", { class: "mono", text: aw.worker_id }),
                " ",
                el("span", {
                  class: `pill ${aw.connected ? "ok" : ""}`,
                  text: aw.connected ? "connected" : "offline",
                }),
              ),
            ),
          ),
          el("td", { class: "num", text: fmtInt(w.tasks) }),
          el("td", { class: "secondary", text: states || "–" }),
          el("td", {
            class: "num",
            title: w.last_seen || "",
            dataset: { ago: last ?? "" },
            text: ago(last, now),
          }),
          el(
            "td",
            { class: "row-actions" },
            (w.actions || []).length
              ? w.actions.map((action) =>
                  el("button", {
                    class: `btn small${CONTROLS[action] && CONTROLS[action].danger ? " danger" : ""}`,
                    type: "button",
                    dataset: { action },
                    text: (CONTROLS[action] && CONTROLS[action].label) || action,
                    onclick: () => askControl(w, action),
                  }),
                )
              : el("span", { class: "muted", text: "none offered" }),
          ),
        );
      }),
    );
    $("engine-workers-empty").hidden = engineWorkers.length > 0;
  }

  function askControl(worker, action) {
    const control = CONTROLS[action] || { ask: () => `${action} on ${worker.worker}?`, go: "Send" };
    controlling = { worker, action };
    const panel = $("control-panel");
    panel.dataset.action = action;
    showText("engine-workers-error", "");
    $("control-text").replaceChildren(
      el("b", { text: control.ask(worker) }),
      " ",
      `The brain sends it to ${agentLabel(worker.agent_id)}, which reported the worker. `,
      el("span", { class: "caution-text", text: workersWarning }),
    );
    const inputs = CONTROL_INPUTS[action] || [];
    for (const name of ["delta", "queue", "task", "rate"]) {
      $(`control-${name}-label`).hidden = !inputs.includes(name);
    }
    $("control-delta").value = "1";
    $("control-queue").value = "";
    $("control-task").value = "";
    $("control-rate").value = "";
    const go = $("control-confirm");
    go.textContent = control.go;
    go.classList.toggle("danger-fill", Boolean(control.danger));
    panel.hidden = false;
    (inputs.length ? $(`control-${inputs[0]}`) : go).focus();
  }

  function controlBody(action) {
    const inputs = CONTROL_INPUTS[action] || [];
    const body = {};
    if (inputs.includes("delta")) {
      const typed = $("control-delta").value.trim();
      if (!/^\d+$/.test(typed) || Number(typed) < 1 || Number(typed) > 100) {
        throw new Error("Give the number of processes, a whole number from 1 to 100.");
      }
      body.delta = Number(typed);
    }
    if (inputs.includes("queue")) {
      body.queue = $("control-queue").value.trim();
      if (!body.queue) throw new Error("Give the queue.");
    }
    if (inputs.includes("task")) {
      body.task_name = $("control-task").value.trim();
      if (!body.task_name) throw new Error("Give the task's name.");
    }
    if (inputs.includes("rate")) {
      body.rate = $("control-rate").value.trim();
      if (!/^(0|[1-9]\d{0,8}(\/[smh])?)$/.test(body.rate)) {
        throw new Error("A rate is 0 (no limit), or a number per task: 10, 10/s, 10/m or 10/h.");
      }
    }
    return body;
  }

  $("control-panel").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!controlling) return;
    const { worker, action } = controlling;
    let body;
    try {
      body = controlBody(action);
    } catch (error) {
      showText("engine-workers-error", error.message);
      return;
    }
    if (worker.agent_id) body.agent_id = worker.agent_id;
    const button = $("control-confirm");
    button.disabled = true;
    showText("engine-workers-error", "");
    try {
      const path =
        `/api/v1/engine-workers/${encodeURIComponent(worker.engine)}/` +
        `${encodeURIComponent(worker.worker)}/${action}`;
      const sent = await api("POST", path, body);
      controlling = null;
      $("control-panel").hidden = true;
      const rec = sent.command;
      const label = (CONTROLS[action] && CONTROLS[action].label) || action;
      controlSent = { id: String(rec.id), label, worker: worker.worker, warning: sent.warning };
      upsertCommand(rec, { flash: true });
      // The socket may have told of its end before this answer came: show the latest.
      showControlState(commands.get(String(rec.id)) || rec);
    } catch (error) {
      if (error.status !== 401) showText("engine-workers-error", error.message);
    } finally {
      button.disabled = false;
    }
  });
  $("control-cancel").addEventListener("click", () => {
    controlling = null;
    $("control-panel").hidden = true;
  });
  $("engine-workers-refresh").addEventListener("click", loadEngineWorkers);

  // The control's command as it goes: its state, and what that state does not prove.
  function showControlState(rec) {
    const sent = controlSent;
    const box = $("control-result");
    box.dataset.command = sent.id;
    box.dataset.state = rec.state;
    box.replaceChildren(
      `${sent.label} of ${sent.worker} sent as command ${shortId(sent.id)}: `,
      el("b", { class: "control-state", text: rec.state }),
      rec.error ? ` (${rec.error})` : "",
      ". ",
      el("span", {
        class: "caution-text",
        text:
          rec.state === "completed"
            ? "Completed only means the broadcast was sent: " + sent.warning
            : sent.warning,
      }),
    );
    box.hidden = false;
  }

  // -- schedules ---------------------------------------------------------------------------------
  //
  // Rows are what the scheduler adapters last published; an action is a
  // command to the worker publishing that scheduler, and its effect shows
  // when the adapter's next snapshot lands (a "schedule.*" event reloads the
  // list). The notice follows the command to its end.

  const SCHEDULES_PAGE = 500; // the API's largest page
  const SCHEDULES_POLL_MS = 10000;
  const SCHEDULE_FILTER_INPUTS = {
    scheduler: "sf-scheduler",
    engine: "sf-engine",
    enabled: "sf-enabled",
  };
  const SCHEDULE_VERBS = {
    enable: "Enable",
    disable: "Disable",
    trigger: "Run now",
    delete: "Delete",
  };
  const scheduleList = { items: [], cursor: null, gen: 0, query: null };
  const schedulersSeen = new Set();
  const scheduleCommands = new Map(); // command id -> what it does, while the notice shows it
  let schedulesLoadedAt = 0;
  let deleting = null; // the schedule awaiting the operator's yes

  const scheduleKey = (s) => `${s.project_id}|${s.scheduler}|${s.source_key}`;

  function scheduleQuery() {
    const params = new URLSearchParams();
    for (const [name, id] of Object.entries(SCHEDULE_FILTER_INPUTS)) {
      const value = $(id).value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  function schedulePath(s, action) {
    const base = `/api/v1/schedules/${encodeURIComponent(s.scheduler)}/${encodeURIComponent(
      s.source_key,
    )}`;
    return `${action ? `${base}/${action}` : base}?project_id=${encodeURIComponent(s.project_id)}`;
  }

  async function loadSchedules({ fresh = false } = {}) {
    const gen = ++scheduleList.gen;
    schedulesLoadedAt = Date.now();
    const params = scheduleQuery();
    const query = params.toString();
    if (query !== scheduleList.query) fresh = true;
    scheduleList.query = query;
    params.set("limit", String(SCHEDULES_PAGE));
    try {
      const data = await api("GET", `/api/v1/schedules?${params}`);
      if (gen !== scheduleList.gen) return;
      scheduleList.items = data.items || [];
      scheduleList.cursor = data.next_cursor ?? null;
      showText("schedules-error", "");
    } catch (error) {
      if (gen !== scheduleList.gen || error.status === 401) return;
      showText("schedules-error", error.message);
    }
    if (fresh) hideScheduleDelete();
    renderSchedules();
  }

  async function moreSchedules() {
    if (!scheduleList.cursor) return;
    const gen = scheduleList.gen;
    const params = scheduleQuery();
    params.set("limit", String(SCHEDULES_PAGE));
    params.set("cursor", scheduleList.cursor);
    const button = $("schedules-more");
    button.disabled = true;
    try {
      const data = await api("GET", `/api/v1/schedules?${params}`);
      if (gen !== scheduleList.gen) return;
      const known = new Set(scheduleList.items.map(scheduleKey));
      for (const s of data.items || []) if (!known.has(scheduleKey(s))) scheduleList.items.push(s);
      scheduleList.cursor = data.next_cursor ?? null;
    } catch (error) {
      if (error.status !== 401) showText("schedules-error", error.message);
    } finally {
      button.disabled = false;
    }
    renderSchedules();
  }

  function runTime(iso, now) {
    const ms = parseTime(iso);
    if (ms == null) return el("span", { class: "muted", text: "–" });
    return el("span", { title: iso, text: ms > now ? fmtWhen(ms) : ago(ms, now) });
  }

  function renderSchedules() {
    const now = serverNow();
    const body = $("schedules-table").tBodies[0];
    body.replaceChildren(
      ...scheduleList.items.map((s) => {
        schedulersSeen.add(s.scheduler);
        enginesSeen.add(s.engine);
        const updated = parseTime(s.updated_at);
        const offered = new Set(s.actions || []);
        const buttons = [];
        const toggle = s.is_enabled ? "disable" : "enable";
        if (offered.has(toggle)) buttons.push(toggle);
        if (offered.has("trigger")) buttons.push("trigger");
        if (offered.has("delete")) buttons.push("delete");
        return el(
          "tr",
          { dataset: { scheduler: s.scheduler, sourceKey: s.source_key } },
          el(
            "td",
            null,
            el("span", {
              class: `pill ${s.is_enabled ? "ok" : "warn"}`,
              dataset: { enabled: String(s.is_enabled) },
              text: s.is_enabled ? "enabled" : "disabled",
            }),
          ),
          el(
            "td",
            { class: "trunc", title: s.source_key },
            el("b", { text: s.name }),
            s.source_key !== s.name
              ? [el("br"), el("span", { class: "mono secondary", text: s.source_key })]
              : null,
          ),
          el("td", null, el("span", { class: "tag", text: s.scheduler })),
          el(
            "td",
            { title: `${s.kind} (${s.timezone})` },
            el("span", { class: "mono", text: s.expression || "–" }),
            " ",
            el("span", {
              class: "secondary",
              text: s.timezone === "UTC" ? s.kind : `${s.kind}, ${s.timezone}`,
            }),
          ),
          el(
            "td",
            { class: "trunc", title: s.task_name },
            el("span", { class: "tag", text: s.engine }),
            " ",
            el("span", { class: "mono", text: s.task_name }),
            s.queue ? el("span", { class: "secondary", text: ` → ${s.queue}` }) : null,
          ),
          el("td", { class: "num", text: fmtInt(s.total_runs) }),
          el("td", { class: "num" }, runTime(s.last_run_at, now)),
          el("td", { class: "num" }, runTime(s.next_run_at, now)),
          el("td", {
            class: "secondary trunc",
            title: `${s.agent_id} / ${s.worker_id ?? ""}`,
            text: `${agentLabel(s.agent_id)} · ${s.worker_id ?? "?"}`,
          }),
          el("td", {
            class: "num",
            title: s.updated_at
              ? `${fmtWhen(updated)}: epoch ${s.epoch_number}, sequence ${s.sequence}`
              : "",
            dataset: { ago: updated ?? "" },
            text: ago(updated, now),
          }),
          el(
            "td",
            { class: "num actions" },
            buttons.length
              ? buttons.map((action) =>
                  el("button", {
                    class: `btn small${action === "delete" ? " danger" : ""}`,
                    type: "button",
                    dataset: { action },
                    text: SCHEDULE_VERBS[action],
                    onclick: (event) =>
                      action === "delete"
                        ? askScheduleDelete(s)
                        : scheduleAction(s, action, event.currentTarget),
                  }),
                )
              : el("span", {
                  class: "muted",
                  title: "Its scheduler's worker is not connected, or offers no action",
                  text: "–",
                }),
          ),
        );
      }),
    );
    $("schedules-empty").hidden = scheduleList.items.length > 0;
    $("schedules-more").hidden = !scheduleList.cursor;
    $("schedules-hint").textContent = scheduleList.items.length
      ? `${fmtInt(scheduleList.items.length)} shown, as the scheduler adapters last published them`
      : "as the scheduler adapters last published them";
    const list = $("sf-schedulers");
    const names = [...schedulersSeen].sort();
    if (list.children.length !== names.length)
      list.replaceChildren(...names.map((name) => el("option", { value: name })));
  }

  function scheduleSent(what, records) {
    const text = records.length
      ? `${what} sent as command${records.length > 1 ? "s" : ""} ` +
        `${records.map((rec) => `${shortId(rec.id)} (${rec.state})`).join(", ")}.`
      : `${what}: nothing sent.`;
    scheduleCommands.clear();
    for (const rec of records) {
      upsertCommand(rec, { flash: true });
      scheduleCommands.set(String(rec.id), what);
    }
    showText("schedules-result", text);
    $("schedules-result").dataset.command = records.map((rec) => rec.id).join(" ");
    // The live feed may have told of its end before this answer came back.
    for (const rec of records) onScheduleCommand(commands.get(String(rec.id)));
  }

  // The notice follows its commands: their outcome, then the list again.
  function onScheduleCommand(rec) {
    if (!rec || !scheduleCommands.has(String(rec.id)) || !TERMINAL.has(rec.state)) return;
    const what = scheduleCommands.get(String(rec.id));
    scheduleCommands.delete(String(rec.id));
    const outcome =
      rec.state === "completed"
        ? `${what}: command ${shortId(rec.id)} completed.`
        : `${what}: command ${shortId(rec.id)} ${rec.state}` +
          (rec.error ? `: ${preview(rec.error, 300)}` : ".");
    showText("schedules-result", outcome);
    $("schedules-result").classList.toggle("bad-text", rec.state !== "completed");
    refreshSchedulesSoon();
  }

  async function scheduleAction(s, action, button) {
    showText("schedules-error", "");
    $("schedules-result").classList.remove("bad-text");
    if (button) button.disabled = true;
    try {
      const rec = await api("POST", schedulePath(s, action));
      scheduleSent(`${SCHEDULE_VERBS[action]} “${s.name}”`, [rec]);
    } catch (error) {
      if (error.status !== 401) showText("schedules-error", error.message);
    } finally {
      if (button) button.disabled = false;
    }
  }

  function askScheduleDelete(s) {
    deleting = s;
    $("schedule-delete-text").replaceChildren(
      el("b", { text: `Delete the schedule “${s.name}” from ${s.scheduler}?` }),
      " Its scheduler stops firing it; where it is defined in code, the adapter keeps the " +
        "deletion as an override.",
    );
    $("schedule-delete-panel").hidden = false;
    $("schedule-delete-confirm").focus();
  }

  function hideScheduleDelete() {
    deleting = null;
    $("schedule-delete-panel").hidden = true;
  }

  $("schedule-delete-confirm").addEventListener("click", async (event) => {
    const s = deleting;
    if (!s) return;
    hideScheduleDelete();
    await scheduleAction(s, "delete", event.currentTarget);
  });
  $("schedule-delete-cancel").addEventListener("click", hideScheduleDelete);

  $("schedules-sync").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    button.disabled = true;
    showText("schedules-error", "");
    $("schedules-result").classList.remove("bad-text");
    try {
      const data = await api("POST", "/api/v1/schedules/resync");
      scheduleSent("Sync now", data.commands || []);
    } catch (error) {
      if (error.status !== 401) showText("schedules-error", error.message);
    } finally {
      button.disabled = false;
    }
  });

  let scheduleFilterTimer = 0;
  function scheduleFiltersChanged() {
    clearTimeout(scheduleFilterTimer);
    scheduleFilterTimer = setTimeout(() => {
      if (scheduleQuery().toString() === scheduleList.query) return;
      loadSchedules({ fresh: true });
    }, 250);
  }
  $("schedule-filters").addEventListener("input", scheduleFiltersChanged);
  $("schedule-filters").addEventListener("change", scheduleFiltersChanged);
  $("schedule-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(scheduleFilterTimer);
    loadSchedules({ fresh: true });
  });
  $("sf-clear").addEventListener("click", () => {
    for (const id of Object.values(SCHEDULE_FILTER_INPUTS)) $(id).value = "";
    scheduleFiltersChanged();
  });
  $("schedules-more").addEventListener("click", moreSchedules);

  // -- the OpAMP fleet: #/fleet, #/fleet/<instance uid>?project=<name> ---------------------------
  //
  // Agents are what /api/v1/opamp/agents lists. An ``opamp_agent`` message
  // (an agent's row or its configuration's status written) reloads the page
  // shown, at most once a second; "online" also ends by silence, which no
  // message announces: the slow refresh under the socket (POLL_MS) shows it.
  // Attribute names and values, statuses and error messages are the agents'
  // own text: they go into the page with textContent only, as everything does.

  const OPAMP_STATUS_CLASS = {
    pending: "warn",
    applying: "info live",
    applied: "ok",
    failed: "bad",
  };
  const YAML_TYPES = new Set([
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
  ]);
  const fleet = { items: [], gen: 0 };
  const opampProjects = new Set(); // names, for the project filter and the rollout form
  let projectsAsked = false;

  // The projects' names, asked once per page (agents' and rollouts' add to them).
  async function loadOpampProjects() {
    if (projectsAsked) return;
    projectsAsked = true;
    try {
      const data = await api("GET", "/api/v1/projects");
      for (const p of data.items || []) opampProjects.add(p.name);
    } catch {
      projectsAsked = false; // next time
    }
  }

  const mediaType = (contentType) =>
    String(contentType ?? "")
      .split(";")[0]
      .trim()
      .toLowerCase();
  const isJsonType = (t) => mediaType(t) === "application/json" || mediaType(t).endsWith("+json");
  const isYamlType = (t) => YAML_TYPES.has(mediaType(t)) || mediaType(t).endsWith("+yaml");

  function attrText(value) {
    if (value == null) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function serviceName(a) {
    const name = (a.identifying || {})["service.name"];
    return name == null || name === "" ? null : attrText(name);
  }

  function agentHref(uid, project) {
    const base = `#/fleet/${encodeURIComponent(uid)}`;
    return project ? `${base}?project=${encodeURIComponent(project)}` : base;
  }

  function opampPath(uid, project, tail = "") {
    const path = `/api/v1/opamp/agents/${encodeURIComponent(uid)}${tail}`;
    const sep = tail.includes("?") ? "&" : "?";
    return project ? `${path}${sep}project=${encodeURIComponent(project)}` : path;
  }

  function onlinePill(online) {
    return el("span", {
      class: `pill ${online ? "ok" : ""}`,
      dataset: { online: online ? "true" : "false" },
      text: online ? "online" : "offline",
    });
  }

  function healthPill(health) {
    if (!health) return el("span", { class: "muted", text: "not reported" });
    return el("span", {
      class: `pill ${health.healthy ? "ok" : "bad"}`,
      dataset: { healthy: health.healthy ? "true" : "false" },
      text: health.healthy ? "healthy" : "unhealthy",
    });
  }

  function configPill(status, title) {
    if (!status) return el("span", { class: "muted", text: "none" });
    return el("span", {
      class: `pill ${OPAMP_STATUS_CLASS[status] ?? ""}`,
      dataset: { status },
      title: title || null,
      text: status,
    });
  }

  function fleetMatches(a, online, q) {
    if (online === "online" && !a.online) return false;
    if (online === "offline" && a.online) return false;
    if (!q) return true;
    const hay = [a.instance_uid, serviceName(a) ?? ""];
    for (const attrs of [a.identifying, a.non_identifying]) {
      for (const [key, value] of Object.entries(attrs || {})) hay.push(`${key}=${attrText(value)}`);
    }
    return hay.some((text) => text.toLowerCase().includes(q));
  }

  async function loadFleet() {
    const gen = ++fleet.gen;
    const project = $("fl-project").value;
    const query = project ? `?project=${encodeURIComponent(project)}` : "";
    try {
      const [data] = await Promise.all([
        api("GET", `/api/v1/opamp/agents${query}`),
        loadOpampProjects(),
      ]);
      if (gen !== fleet.gen) return;
      fleet.items = data.items || [];
      showText("fleet-error", "");
    } catch (error) {
      if (gen !== fleet.gen || error.status === 401) return;
      showText("fleet-error", error.message);
    }
    renderFleet();
  }

  function renderProjectOptions(select, anyLabel) {
    const current = select.value;
    const names = [...opampProjects].sort();
    if (current && !opampProjects.has(current)) names.push(current);
    fill(
      select,
      anyLabel == null ? null : el("option", { value: "", text: anyLabel }),
      names.map((name) => el("option", { value: name, text: name })),
    );
    select.value = current;
  }

  function renderFleet() {
    const now = serverNow();
    for (const a of fleet.items) if (a.project) opampProjects.add(a.project);
    renderProjectOptions($("fl-project"), "any project");
    const online = $("fl-online").value;
    const q = $("fl-q").value.trim().toLowerCase();
    const shown = fleet.items.filter((a) => fleetMatches(a, online, q));
    shown.sort(
      (a, b) =>
        (serviceName(a) ?? "\uffff").localeCompare(serviceName(b) ?? "\uffff") ||
        String(a.project).localeCompare(String(b.project)) ||
        a.instance_uid.localeCompare(b.instance_uid),
    );
    const body = $("fleet-table").tBodies[0];
    body.replaceChildren(
      ...shown.map((a) => {
        const href = agentHref(a.instance_uid, a.project);
        const seen = parseTime(a.last_seen);
        const desired = a.desired_config;
        const health = a.health;
        return el(
          "tr",
          {
            class: `clickable ${a.online ? "" : "dim"}`,
            dataset: { uid: a.instance_uid, project: a.project ?? "" },
            onclick: (event) => {
              if (!event.target.closest("a")) location.hash = href;
            },
          },
          el(
            "td",
            { dataset: { col: "service" } },
            el("a", {
              class: "task-link",
              href,
              text: serviceName(a) ?? "(no service.name)",
            }),
          ),
          el("td", { class: "mono secondary", dataset: { col: "uid" }, text: a.instance_uid }),
          el("td", { dataset: { col: "project" }, text: a.project ?? "–" }),
          el("td", { dataset: { col: "online" } }, onlinePill(a.online)),
          el(
            "td",
            { dataset: { col: "health" } },
            healthPill(health),
            health && health.status
              ? el("span", { class: "secondary health-status", text: ` ${health.status}` })
              : null,
          ),
          el("td", { dataset: { col: "transport" }, text: a.transport || "–" }),
          el(
            "td",
            { dataset: { col: "config" } },
            configPill(desired && desired.status, desired && desired.error_message),
          ),
          el("td", {
            class: "num",
            title: a.last_seen || "",
            dataset: { ago: seen ?? "" },
            text: ago(seen, now),
          }),
        );
      }),
    );
    $("fleet-empty").hidden = shown.length > 0;
    const onlineCount = fleet.items.filter((a) => a.online).length;
    $("fleet-hint").textContent = fleet.items.length
      ? `${shown.length} of ${fleet.items.length} shown · ${onlineCount} online`
      : "agents that report to /v1/opamp";
  }

  let fleetFilterTimer = 0;
  $("fleet-filters").addEventListener("input", (event) => {
    clearTimeout(fleetFilterTimer);
    if (event.target.id === "fl-project") return; // its "change" reloads
    fleetFilterTimer = setTimeout(renderFleet, 150);
  });
  $("fl-project").addEventListener("change", loadFleet);
  $("fl-online").addEventListener("change", renderFleet);
  $("fleet-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    renderFleet();
  });
  $("fl-clear").addEventListener("click", () => {
    const reload = $("fl-project").value !== "";
    $("fl-project").value = "";
    $("fl-online").value = "";
    $("fl-q").value = "";
    if (reload) loadFleet();
    else renderFleet();
  });
  $("fleet-refresh").addEventListener("click", loadFleet);

  // -- one OpAMP agent: what it reports, and the configuration it should run --------------------

  const opampAgent = {
    agent: null,
    config: null, // the stored desired configuration (with its files), or null
    digests: new Map(), // desired file name -> sha256 hex, when this page can hash
    digestsOf: null, // the desired configuration's hash they are of
    gen: 0,
    dirty: false, // the editor holds changes not pushed
    busy: false,
    history: [], // newest first: the first page, and any older pages asked for
    historyCursor: null, // the next older page, or null at the end
  };

  function openOpampAgent() {
    opampAgent.agent = null;
    opampAgent.config = null;
    opampAgent.digests = new Map();
    opampAgent.digestsOf = null;
    opampAgent.dirty = false;
    opampAgent.history = [];
    opampAgent.historyCursor = null;
    opampAgent.gen += 1;
    $("oa-title").textContent = route.uid;
    $("oa-online").replaceChildren();
    $("oa-health").replaceChildren();
    showText("oa-error", "");
    showText("ce-error", "");
    showText("ce-result", "");
    $("config-card").hidden = true;
    $("oa-body").replaceChildren(el("div", { class: "empty", text: "Loading…" }));
    loadOpampAgent();
  }

  async function sha256Hex(text) {
    if (!(window.crypto && crypto.subtle)) return null; // not a secure context: sizes only
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
    return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function loadOpampAgent() {
    const { uid, project } = route;
    const gen = ++opampAgent.gen;
    try {
      const agent = await api("GET", opampPath(uid, project));
      if (gen !== opampAgent.gen || route.view !== "opamp-agent") return;
      const desired = agent.desired_config;
      let config = opampAgent.config;
      if (!desired) config = null;
      else if (!config || config.config_hash !== desired.config_hash) {
        try {
          config = await api("GET", opampPath(uid, agent.project, "/config"));
        } catch (error) {
          if (error.status !== 404) throw error;
          config = null; // deleted in between
        }
        if (gen !== opampAgent.gen) return;
      } else {
        config = { ...config, ...desired }; // the status moved; the files did not
      }
      if (config && opampAgent.digestsOf !== config.config_hash) {
        const digests = new Map();
        for (const [name, file] of Object.entries(config.files || {})) {
          const hex = await sha256Hex(file.body);
          if (hex) digests.set(name, hex);
        }
        if (gen !== opampAgent.gen) return;
        opampAgent.digests = digests;
        opampAgent.digestsOf = config.config_hash;
      }
      // The newest page of its history, keeping older pages already shown.
      const recent = await api("GET", opampPath(uid, agent.project, "/history?limit=20"));
      if (gen !== opampAgent.gen) return;
      const newest = new Set(recent.items.map((e) => e.id));
      const oldest = recent.items.length ? recent.items[recent.items.length - 1].id : Infinity;
      const older = opampAgent.history.filter((e) => !newest.has(e.id) && e.id < oldest);
      opampAgent.history = [...recent.items, ...older];
      if (!older.length) opampAgent.historyCursor = recent.next_cursor;
      const first = opampAgent.agent == null;
      opampAgent.agent = agent;
      opampAgent.config = config;
      showText("oa-error", "");
      renderOpampAgent();
      if (first || !opampAgent.dirty) fillEditor(config);
    } catch (error) {
      if (gen !== opampAgent.gen || error.status === 401) return;
      if (opampAgent.agent) {
        showText("oa-error", error.message);
        return;
      }
      $("oa-body").replaceChildren(
        el("div", {
          class: "empty",
          text: error.status === 404 ? `No OpAMP agent ${uid} is known here.` : error.message,
        }),
      );
    }
  }

  function attributeTable(id, attrs) {
    const entries = Object.entries(attrs || {}).sort(([a], [b]) => a.localeCompare(b));
    if (!entries.length) return el("div", { id, class: "muted", text: "none reported" });
    return el(
      "table",
      { id, class: "attributes" },
      el(
        "tbody",
        null,
        entries.map(([key, value]) =>
          el(
            "tr",
            { dataset: { key } },
            el("td", { class: "mono attr-key", text: key }),
            el("td", { class: "mono attr-value", text: attrText(value) }),
          ),
        ),
      ),
    );
  }

  const nanos = (value) => (value ? Number(value) / 1e6 : null);

  function healthNode(name, health) {
    const started = nanos(health.start_time_unix_nano);
    const components = Object.entries(health.components || {});
    return el(
      "li",
      { class: "health-node", dataset: { component: name, healthy: String(!!health.healthy) } },
      el(
        "div",
        { class: "health-line" },
        healthPill(health),
        el("span", { class: "health-name mono", text: name }),
        health.status ? el("span", { class: "health-status", text: health.status }) : null,
        health.last_error
          ? el("span", { class: "bad-text health-error", text: health.last_error })
          : null,
        started ? el("span", { class: "muted", text: `since ${fmtWhen(started)}` }) : null,
      ),
      components.length
        ? el(
            "ul",
            { class: "health-tree" },
            components.map(([child, h]) => healthNode(child, h)),
          )
        : null,
    );
  }

  function hashText(hex) {
    return hex ? el("span", { class: "mono", title: hex, text: hex.slice(0, 16) }) : "–";
  }

  function fileCell(file, digest) {
    if (!file) return el("td", { class: "muted", text: "–" });
    return el(
      "td",
      null,
      el("div", {
        class: "mono",
        text: `${fmtInt(file.bytes)} B · ${file.content_type || "no type"}`,
      }),
      digest
        ? el("div", { class: "mono secondary", title: digest, text: digest.slice(0, 16) })
        : null,
    );
  }

  // Effective (what the agent says it runs: names, types, sizes, digests; z4j
  // does not keep its bodies) against desired (what was pushed, with bodies).
  function configComparison(agent, config) {
    const effective = agent.effective_config;
    const desiredHash = config ? config.config_hash : null;
    const effectiveHash = effective ? effective.config_hash : null;
    let verdict;
    if (!config) verdict = el("span", { class: "muted", text: "no desired configuration" });
    else if (!effective) verdict = el("span", { class: "muted", text: "effective not reported" });
    else if (desiredHash === effectiveHash)
      verdict = el("span", { class: "pill ok", dataset: { match: "true" }, text: "match" });
    else verdict = el("span", { class: "pill warn", dataset: { match: "false" }, text: "differ" });
    const byName = new Map();
    for (const f of (effective && effective.files) || []) byName.set(f.name, { effective: f });
    for (const [name, file] of Object.entries((config && config.files) || {})) {
      const entry = byName.get(name) || {};
      entry.desired = {
        content_type: file.content_type,
        bytes: new TextEncoder().encode(file.body).length,
        sha256: opampAgent.digests.get(name) ?? null,
      };
      byName.set(name, entry);
    }
    const rows = [...byName.entries()].sort(([a], [b]) => a.localeCompare(b));
    return [
      el(
        "dl",
        { class: "facts", id: "oa-config-hashes" },
        el("dt", { text: "Effective hash" }),
        el("dd", { dataset: { field: "effective_hash" } }, hashText(effectiveHash)),
        el("dt", { text: "Desired hash" }),
        el("dd", { dataset: { field: "desired_hash" } }, hashText(desiredHash)),
        el("dt", { text: "Effective vs desired" }),
        el("dd", { dataset: { field: "match" } }, verdict),
      ),
      rows.length
        ? el(
            "table",
            { id: "oa-config-files" },
            el(
              "thead",
              null,
              el(
                "tr",
                null,
                ["File", "Effective", "Desired", ""].map((h) => el("th", { text: h })),
              ),
            ),
            el(
              "tbody",
              null,
              rows.map(([name, { effective: e, desired: d }]) => {
                let same = "";
                if (e && d) {
                  if (d.sha256) same = e.sha256 === d.sha256 ? "same" : "differs";
                  else
                    same =
                      e.bytes === d.bytes && e.content_type === d.content_type
                        ? "same size"
                        : "differs";
                } else same = e ? (config ? "not desired" : "") : "not running";
                return el(
                  "tr",
                  { dataset: { file: name, same } },
                  el("td", { class: "mono", text: name }),
                  fileCell(e, e && e.sha256),
                  fileCell(d, d && d.sha256),
                  el("td", {
                    class: same === "same" || same === "same size" ? "ok-text" : "warn-text",
                    text: same,
                  }),
                );
              }),
            ),
          )
        : null,
    ];
  }

  function renderOpampAgent() {
    const a = opampAgent.agent;
    const config = opampAgent.config;
    $("oa-title").textContent = serviceName(a) ?? a.instance_uid;
    $("oa-online").replaceChildren(onlinePill(a.online));
    $("oa-health").replaceChildren(healthPill(a.health));
    const reported = a.remote_config_status;
    const facts = [
      ["instance_uid", "Instance uid", el("span", { class: "mono", text: a.instance_uid })],
      ["project", "Project", a.project ?? "–"],
      ["transport", "Transport", a.transport || "–"],
      ["sequence_num", "Sequence", fmtInt(a.sequence_num)],
      ["first_seen", "First seen", when(a.first_seen)],
      ["last_seen", "Last seen", when(a.last_seen)],
      ["disconnected_at", "Said goodbye", when(a.disconnected_at)],
    ];
    const reportedFacts = reported
      ? [
          ["status", "Reported", configPill(reported.status === "unset" ? null : reported.status)],
          ["hash", "For hash", hashText(reported.last_remote_config_hash)],
          [
            "for_desired",
            "Is the desired one",
            config ? (reported.last_remote_config_hash === config.config_hash ? "yes" : "no") : "–",
          ],
          [
            "error_message",
            "Agent's error",
            reported.error_message
              ? el("span", { class: "bad-text", text: reported.error_message })
              : "–",
          ],
        ]
      : [];
    const dl = (id, rows) =>
      el(
        "dl",
        { class: "facts", id },
        rows.map(([key, label, value]) => [
          el("dt", { text: label }),
          el("dd", { dataset: { field: key } }, value),
        ]),
      );
    fill(
      $("oa-body"),
      block("Agent", "oa-summary-block", dl("oa-summary", facts)),
      el(
        "div",
        { class: "two" },
        block(
          "Identifying attributes",
          "oa-identifying-block",
          attributeTable("oa-identifying", a.identifying),
        ),
        block(
          "Non-identifying attributes",
          "oa-non-identifying-block",
          attributeTable("oa-non-identifying", a.non_identifying),
        ),
      ),
      block(
        "Capabilities",
        "oa-capabilities-block",
        el(
          "div",
          { id: "oa-capabilities", class: "capabilities" },
          (a.capabilities || []).length
            ? a.capabilities.map((c) => el("span", { class: "tag", text: c }))
            : el("span", { class: "muted", text: "none reported" }),
        ),
      ),
      block(
        "Health",
        "oa-health-block",
        a.health
          ? el("ul", { id: "oa-health-tree", class: "health-tree" }, healthNode("agent", a.health))
          : el("div", { class: "muted", text: "not reported" }),
      ),
      block("Configuration: effective vs desired", "oa-config-block", configComparison(a, config)),
      block(
        "Remote config status (as the agent reports it)",
        "oa-remote-status-block",
        reported
          ? dl("oa-remote-status", reportedFacts)
          : el("div", { class: "muted", text: "not reported" }),
      ),
      block("History", "oa-history-block", historyTable()),
    );
    renderConfigStatus();
  }

  // One line per change the brain recorded (heartbeats record none).
  function historyText(change, details) {
    const d = details[change];
    switch (change) {
      case "connected":
        return "connected";
      case "disconnected":
        return "said goodbye";
      case "instance_uid":
        return `given instance uid ${d}`;
      case "capabilities":
        return `capabilities: ${(d || []).length}`;
      case "agent_description":
        return "description";
      case "health":
        if (!d) return "health";
        return d.healthy ? "healthy" : `unhealthy${d.status ? `: ${d.status}` : ""}`;
      case "effective_config":
        return d ? `effective config ${d.config_hash.slice(0, 12)}` : "effective config";
      case "remote_config_status":
        return d ? `reported ${d.status}` : "remote config status";
      case "config_status":
        return `desired config ${d.config_hash.slice(0, 12)}: ${d.status}${
          d.error_message ? ` (${d.error_message})` : ""
        }`;
      default:
        return change.replaceAll("_", " ");
    }
  }

  function historyTable() {
    const items = opampAgent.history;
    if (!items.length) return el("div", { class: "muted", text: "nothing recorded" });
    return [
      el(
        "table",
        { id: "oa-history", class: "list" },
        el("thead", {}, el("tr", {}, el("th", { text: "When" }), el("th", { text: "What changed" }))),
        el(
          "tbody",
          {},
          items.map((e) =>
            el(
              "tr",
              { dataset: { id: String(e.id), changes: e.changes.join(" ") } },
              el("td", {}, when(e.at)),
              el("td", { text: e.changes.map((c) => historyText(c, e.details)).join("; ") }),
            ),
          ),
        ),
      ),
      opampAgent.historyCursor
        ? el("button", {
            id: "oa-history-more",
            class: "secondary",
            type: "button",
            text: "Older",
            onclick: olderHistory,
          })
        : null,
    ];
  }

  async function olderHistory() {
    const a = opampAgent.agent;
    const cursor = opampAgent.historyCursor;
    if (!a || !cursor) return;
    const gen = opampAgent.gen;
    try {
      const more = await api(
        "GET",
        opampPath(a.instance_uid, a.project, `/history?limit=20&cursor=${encodeURIComponent(cursor)}`),
      );
      if (gen !== opampAgent.gen) return;
      opampAgent.history = [...opampAgent.history, ...more.items];
      opampAgent.historyCursor = more.next_cursor;
      fill($("oa-history-block"), el("h3", { text: "History" }), historyTable());
    } catch (error) {
      if (error.status !== 401) showText("oa-error", error.message);
    }
  }

  function renderConfigStatus() {
    const a = opampAgent.agent;
    const config = opampAgent.config;
    $("config-card").hidden = false;
    $("ce-status").replaceChildren(
      configPill(config && config.status, config && config.error_message),
    );
    $("ce-delete").hidden = !config;
    const accepts = (a.capabilities || []).includes("ACCEPTS_REMOTE_CONFIG");
    fill(
      $("ce-current"),
      accepts
        ? null
        : el("div", {
            class: "caution",
            id: "ce-no-remote",
            text:
              "This agent does not say it accepts remote configuration: " +
              "a configuration pushed here is kept, but offered only once it does.",
          }),
      config
        ? el(
            "dl",
            { class: "facts", id: "ce-summary" },
            el("dt", { text: "Hash" }),
            el("dd", { dataset: { field: "config_hash" } }, hashText(config.config_hash)),
            el("dt", { text: "Status" }),
            el("dd", { dataset: { field: "status" } }, configPill(config.status)),
            el("dt", { text: "Pushed" }),
            el(
              "dd",
              null,
              when(config.created_at),
              config.created_by ? ` by ${config.created_by}` : "",
            ),
            el("dt", { text: "Status since" }),
            el("dd", null, when(config.status_at)),
            config.error_message ? el("dt", { text: "Agent's error" }) : null,
            config.error_message
              ? el("dd", {
                  id: "ce-agent-error",
                  class: "bad-text",
                  dataset: { field: "error_message" },
                  text: config.error_message,
                })
              : null,
          )
        : el("div", { class: "muted", text: "Nothing pushed to this agent yet." }),
    );
  }

  function fileEditor(name, contentType, body) {
    const node = el(
      "fieldset",
      { class: "ce-file" },
      el(
        "div",
        { class: "ce-file-head" },
        el(
          "label",
          { class: "lbl" },
          "File name",
          el("input", { class: "field mono ce-name", value: name, spellcheck: "false" }),
        ),
        el(
          "label",
          { class: "lbl" },
          "Content type",
          el("input", {
            class: "field mono ce-type",
            list: "ce-types",
            value: contentType,
            spellcheck: "false",
          }),
        ),
        el("button", {
          class: "btn small ce-remove",
          type: "button",
          text: "Remove",
          onclick: () => {
            node.remove();
            opampAgent.dirty = true;
          },
        }),
      ),
      el("textarea", { class: "field mono ce-body", rows: "10", spellcheck: "false" }),
      el("div", { class: "form-error ce-file-error", role: "alert", hidden: true }),
    );
    node.querySelector(".ce-body").value = body; // a property: no markup is ever parsed
    return node;
  }

  function fillEditor(config) {
    const files = Object.entries((config && config.files) || {});
    if (!files.length)
      files.push(["collector.yaml", { body: "", content_type: "application/yaml" }]);
    fill(
      $("ce-files"),
      files.map(([name, f]) => fileEditor(name, f.content_type ?? "", f.body ?? "")),
    );
    opampAgent.dirty = false;
  }

  // The editor's files, checked as the brain will check them (JSON parses,
  // names given and distinct); YAML only the brain can parse: its 400 says where.
  function readEditor() {
    const files = {};
    let ok = true;
    for (const node of $("ce-files").querySelectorAll(".ce-file")) {
      const name = node.querySelector(".ce-name").value.trim();
      const contentType = node.querySelector(".ce-type").value.trim();
      const body = node.querySelector(".ce-body").value;
      let problem = "";
      if (!name) problem = "Give the file a name.";
      else if (name in files) problem = `Two files are named ${name}.`;
      else if (isJsonType(contentType)) {
        try {
          JSON.parse(body);
        } catch (error) {
          problem = `${name} is not valid JSON: ${error.message}`;
        }
      }
      const box = node.querySelector(".ce-file-error");
      box.textContent = problem;
      box.hidden = !problem;
      if (problem) ok = false;
      else files[name] = { body, content_type: contentType };
    }
    if (ok && !Object.keys(files).length) throw new Error("Add at least one file.");
    return ok ? files : null;
  }

  function setEditorBusy(busy) {
    opampAgent.busy = busy;
    for (const id of ["ce-push", "ce-delete", "ce-add", "ce-reset"]) $(id).disabled = busy;
  }

  $("config-editor").addEventListener("input", () => {
    opampAgent.dirty = true;
  });
  $("ce-add").addEventListener("click", () => {
    const n = $("ce-files").querySelectorAll(".ce-file").length + 1;
    $("ce-files").append(fileEditor(`file-${n}.yaml`, "application/yaml", ""));
    opampAgent.dirty = true;
  });
  $("ce-reset").addEventListener("click", () => {
    showText("ce-error", "");
    fillEditor(opampAgent.config);
  });
  $("config-editor").addEventListener("submit", async (event) => {
    event.preventDefault();
    const a = opampAgent.agent;
    if (!a || opampAgent.busy) return;
    showText("ce-error", "");
    showText("ce-result", "");
    let files;
    try {
      files = readEditor();
    } catch (error) {
      showText("ce-error", error.message);
      return;
    }
    if (!files) {
      showText("ce-error", "Fix the files marked above; nothing was pushed.");
      return;
    }
    setEditorBusy(true);
    try {
      const config = await api("PUT", opampPath(a.instance_uid, a.project, "/config"), {
        files,
      });
      opampAgent.config = config;
      opampAgent.dirty = false;
      renderConfigStatus();
      showText(
        "ce-result",
        `Pushed ${config.config_hash.slice(0, 16)}… (${config.status}): ` +
          "offered on the agent's next poll until it reports it applied.",
      );
      loadOpampAgent(); // the digests, and the agent's own view
    } catch (error) {
      if (error.status !== 401) showText("ce-error", error.message);
    } finally {
      setEditorBusy(false);
    }
  });
  $("ce-delete").addEventListener("click", async () => {
    const a = opampAgent.agent;
    if (!a || opampAgent.busy) return;
    showText("ce-error", "");
    showText("ce-result", "");
    setEditorBusy(true);
    try {
      await api("DELETE", opampPath(a.instance_uid, a.project, "/config"));
      opampAgent.config = null;
      showText("ce-result", "No longer offered. The agent keeps running what it has.");
      loadOpampAgent();
    } catch (error) {
      if (error.status !== 401) showText("ce-error", error.message);
    } finally {
      setEditorBusy(false);
    }
  });

  const refreshFleetSoon = throttle(() => route.view === "fleet" && loadFleet(), 1000);
  const refreshOpampAgentSoon = throttle(
    () => route.view === "opamp-agent" && loadOpampAgent(),
    1000,
  );

  function onOpampAgentMessage(msg) {
    if (route.view === "fleet") refreshFleetSoon();
    else if (route.view === "opamp-agent" && msg.instance_uid === route.uid) {
      refreshOpampAgentSoon();
    }
  }

  // -- rollouts: #/rollouts, #/rollouts/<id> ------------------------------------------------------
  //
  // Built against the rollouts API (/api/v1/opamp/rollouts) and its
  // ``opamp_rollout`` message; a brain without that API answers 404, and the
  // page says so instead of failing.

  const ROLLOUT_STATE_CLASS = {
    running: "info live",
    halted: "warn",
    completed: "ok",
    cancelled: "",
  };
  const ROLLOUT_COUNTS = ["applied", "failed", "applying", "pending"];
  const rollouts = { items: [], gen: 0, available: null, detail: null };

  function rolloutsUnavailable() {
    rollouts.available = false;
    $("rollouts-unavailable").hidden = false;
    $("rollouts-body").hidden = true;
    $("rollout-card").hidden = true;
    $("rollouts-card").hidden = false;
  }

  async function loadRollouts() {
    const gen = ++rollouts.gen;
    try {
      await loadOpampProjects(); // for the form's project list
      if (route.rolloutId) {
        const item = await api(
          "GET",
          `/api/v1/opamp/rollouts/${encodeURIComponent(route.rolloutId)}`,
        );
        if (gen !== rollouts.gen) return;
        upsertRollout(item);
        rollouts.detail = rollouts.items.find((r) => r.id === item.id) ?? item;
      } else {
        const data = await api("GET", "/api/v1/opamp/rollouts");
        if (gen !== rollouts.gen) return;
        const held = new Map(rollouts.items.map((r) => [r.id, r]));
        rollouts.items = (data.items || []).map((r) => {
          const mine = held.get(r.id);
          return mine && !fresher(r, mine) ? mine : r;
        });
      }
      rollouts.available = true;
      showText("rollouts-error", "");
      showText("rd-error", "");
    } catch (error) {
      if (gen !== rollouts.gen || error.status === 401) return;
      if (error.status === 404 && !(await rolloutsServed())) {
        rolloutsUnavailable();
        return;
      }
      showText(route.rolloutId ? "rd-error" : "rollouts-error", error.message);
    }
    renderRollouts();
  }

  // Whether this brain serves rollouts: its list answers (a missing rollout
  // or project is a 404 too, but the list is never one where it is served).
  async function rolloutsServed() {
    try {
      await api("GET", "/api/v1/opamp/rollouts");
      return true;
    } catch (error) {
      return error.status !== 404;
    }
  }

  // A read of the API may answer after the socket brought a newer state of
  // the same rollout (the leader assigning its first stage as the page opens
  // it): the one written last (updated_at) is kept, the other dropped.
  function fresher(item, held) {
    return (parseTime(item.updated_at) ?? 0) >= (parseTime(held.updated_at) ?? 0);
  }

  function upsertRollout(item) {
    if (!item || !item.id) return;
    const at = rollouts.items.findIndex((r) => r.id === item.id);
    if (at >= 0) {
      if (!fresher(item, rollouts.items[at])) return;
      rollouts.items[at] = item;
    } else rollouts.items.unshift(item);
    if (rollouts.detail && rollouts.detail.id === item.id) rollouts.detail = item;
  }

  function rolloutPill(state) {
    return el("span", {
      class: `pill ${ROLLOUT_STATE_CLASS[state] ?? ""}`,
      dataset: { state: state ?? "" },
      text: state || "unknown",
    });
  }

  // One bar over all targets: applied, failed, applying, pending (assigned
  // so far), the rest not assigned yet.
  function countsBar(r) {
    const counts = r.counts || {};
    const total = Math.max(1, Number(r.targets) || 0);
    const bar = el("span", { class: "progress", dataset: { targets: r.targets ?? 0 } });
    for (const kind of ROLLOUT_COUNTS) {
      const n = Number(counts[kind]) || 0;
      if (!n) continue;
      const part = el("i", { class: `part-${kind}`, title: `${n} ${kind}` });
      part.style.width = `${(100 * n) / total}%`;
      bar.append(part);
    }
    const text = ROLLOUT_COUNTS.map((k) => `${Number(counts[k]) || 0} ${k}`).join(" · ");
    return el(
      "div",
      { class: "progress-wrap" },
      bar,
      el("span", { class: "secondary progress-text", text: `${text} of ${r.targets ?? 0}` }),
    );
  }

  function stagesBar(r) {
    const stages = Math.max(0, Number(r.stages) || 0);
    const stage = Math.max(0, Number(r.stage) || 0);
    return el(
      "div",
      { class: "progress-wrap" },
      el(
        "span",
        { class: "stages" },
        Array.from({ length: stages }, (_, i) =>
          el("i", { class: i < stage ? "done" : null, title: `stage ${i + 1}` }),
        ),
      ),
      el("span", { class: "secondary", text: `stage ${stage} of ${stages}` }),
    );
  }

  function selectorText(selector) {
    const entries = Object.entries(selector || {});
    return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(", ") : "every agent";
  }

  function renderRollouts() {
    if (rollouts.available === false) return;
    $("rollouts-unavailable").hidden = true;
    $("rollouts-body").hidden = false;
    const detail = route.rolloutId ? rollouts.detail : null;
    $("rollouts-card").hidden = !!route.rolloutId;
    $("rollout-card").hidden = !route.rolloutId;
    if (route.rolloutId) {
      if (detail && detail.id === route.rolloutId) renderRollout(detail);
      return;
    }
    for (const r of rollouts.items) if (r.project) opampProjects.add(r.project);
    fill(
      $("ro-projects"),
      [...opampProjects].sort().map((name) => el("option", { value: name })),
    );
    const now = serverNow();
    const body = $("rollouts-table").tBodies[0];
    body.replaceChildren(
      ...rollouts.items.map((r) => {
        const href = `#/rollouts/${encodeURIComponent(r.id)}`;
        const created = parseTime(r.created_at);
        return el(
          "tr",
          {
            class: "clickable",
            dataset: { id: r.id, state: r.state ?? "" },
            onclick: (event) => {
              if (!event.target.closest("a")) location.hash = href;
            },
          },
          el("td", null, el("a", { class: "task-link mono", href, text: shortId(r.id) })),
          el("td", { text: r.project ?? "–" }),
          el("td", { class: "mono trunc", text: selectorText(r.selector) }),
          el(
            "td",
            null,
            rolloutPill(r.state),
            r.halted_reason ? el("div", { class: "warn-text", text: r.halted_reason }) : null,
          ),
          el("td", null, stagesBar(r)),
          el("td", null, countsBar(r)),
          el("td", {
            class: "num",
            title: r.created_at || "",
            dataset: { ago: created ?? "" },
            text: ago(created, now),
          }),
        );
      }),
    );
    $("rollouts-empty").hidden = rollouts.items.length > 0;
  }

  function renderRollout(r) {
    $("rd-title").textContent = `Rollout ${shortId(r.id)}`;
    $("rd-state").replaceChildren(rolloutPill(r.state));
    const move = (verb, label, cls) =>
      el("button", {
        class: `btn ${cls}`,
        type: "button",
        dataset: { action: verb },
        text: label,
        onclick: (event) => rolloutAction(r, verb, event.currentTarget),
      });
    fill(
      $("rd-actions"),
      r.state === "running" ? move("halt", "Halt", "") : null,
      r.state === "halted" ? move("resume", "Resume", "primary") : null,
      r.state === "running" || r.state === "halted" ? move("cancel", "Cancel", "danger") : null,
    );
    const facts = [
      ["id", "Rollout", el("span", { class: "mono", text: r.id })],
      ["project", "Project", r.project ?? "–"],
      ["selector", "Selector", el("span", { class: "mono", text: selectorText(r.selector) })],
      ["config_hash", "Config hash", hashText(r.config_hash)],
      ["state", "State", rolloutPill(r.state)],
      [
        "halted_reason",
        "Halted because",
        r.halted_reason ? el("span", { class: "warn-text", text: r.halted_reason }) : "–",
      ],
      ["stage", "Stages", stagesBar(r)],
      ["counts", "Targets", countsBar(r)],
      ["created_at", "Started", when(r.created_at)],
      ["created_by", "By", r.created_by || "–"],
    ];
    if (r.canary_percent != null) facts.push(["canary", "Canary", `${r.canary_percent} %`]);
    if (r.batch_size != null) facts.push(["batch", "Batch size", fmtInt(r.batch_size)]);
    if (r.failure_threshold_percent != null)
      facts.push(["threshold", "Halts past", `${r.failure_threshold_percent} % failed`]);
    fill(
      $("rd-body"),
      el(
        "dl",
        { class: "facts", id: "rd-summary" },
        facts.map(([key, label, value]) => [
          el("dt", { text: label }),
          el("dd", { dataset: { field: key } }, value),
        ]),
      ),
    );
  }

  async function rolloutAction(r, verb, button) {
    button.disabled = true;
    showText("rd-error", "");
    try {
      const item = await api("POST", `/api/v1/opamp/rollouts/${encodeURIComponent(r.id)}/${verb}`);
      upsertRollout(item);
      rollouts.detail = item;
      renderRollouts();
    } catch (error) {
      if (error.status !== 401) showText("rd-error", error.message);
    } finally {
      button.disabled = false;
    }
  }

  function openRollouts() {
    showText("rollouts-error", "");
    showText("rd-error", "");
    if (route.rolloutId && (!rollouts.detail || rollouts.detail.id !== route.rolloutId)) {
      rollouts.detail = rollouts.items.find((r) => r.id === route.rolloutId) ?? null;
      $("rd-body").replaceChildren(el("div", { class: "empty", text: "Loading…" }));
      $("rd-actions").replaceChildren();
      $("rd-state").replaceChildren();
      $("rd-title").textContent = `Rollout ${shortId(route.rolloutId)}`;
    }
    renderRollouts();
    loadRollouts();
  }

  function onRolloutMessage(msg) {
    if (!msg.rollout || typeof msg.rollout !== "object") return;
    upsertRollout(msg.rollout);
    if (route.view === "rollouts") renderRollouts();
  }

  $("rollouts-refresh").addEventListener("click", loadRollouts);
  $("rollout-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    showText("ro-error", "");
    const project = $("ro-project").value.trim();
    const name = $("ro-name").value.trim();
    const contentType = $("ro-type").value.trim();
    const body = $("ro-body").value;
    let selector;
    try {
      if (!project) throw new Error("Name the project whose agents it goes to.");
      if (!name) throw new Error("Give the file a name.");
      selector = JSON.parse($("ro-selector").value.trim() || "{}");
      if (!selector || typeof selector !== "object" || Array.isArray(selector))
        throw new Error('The selector is a JSON object, like {"service.name": "checkout"}.');
      if (Object.values(selector).some((v) => typeof v !== "string"))
        throw new Error("Each selector value is text: an attribute must equal it.");
      if (isJsonType(contentType)) {
        try {
          JSON.parse(body);
        } catch (error) {
          throw new Error(`${name} is not valid JSON: ${error.message}`);
        }
      }
    } catch (error) {
      showText(
        "ro-error",
        error instanceof SyntaxError ? `Selector: ${error.message}` : error.message,
      );
      return;
    }
    const number = (id) => Number($(id).value);
    const button = $("ro-start");
    button.disabled = true;
    try {
      const item = await api("POST", "/api/v1/opamp/rollouts", {
        project,
        selector,
        files: { [name]: { body, content_type: contentType } },
        canary_percent: number("ro-canary"),
        batch_size: number("ro-batch"),
        failure_threshold_percent: number("ro-threshold"),
      });
      upsertRollout(item);
      location.hash = `#/rollouts/${encodeURIComponent(item.id)}`;
    } catch (error) {
      if (error.status === 404 && !(await rolloutsServed())) rolloutsUnavailable();
      else if (error.status !== 401) showText("ro-error", error.message);
    } finally {
      button.disabled = false;
    }
  });

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
    mark("instances", "kpis");
    if (route.view === "overview") mark("charts");
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
      refreshView();
    }
    // Depths come with heartbeats, which the socket does not relay: poll them.
    if (route.view === "queues" && Date.now() - queuesLoadedAt >= QUEUES_POLL_MS) loadQueues();
    if (route.view === "workers" && Date.now() - workersLoadedAt >= WORKERS_POLL_MS) {
      loadEngineWorkers();
    }
    // Which worker is connected (the actions offered) changes without events.
    if (route.view === "schedules" && Date.now() - schedulesLoadedAt >= SCHEDULES_POLL_MS)
      loadSchedules();
  }, 1000);

  // -- #/dead-letters: payloads this instance's drain set aside ----------------------------------
  //
  // /api/v1/dead-letters serves the buffer of the brain process that answers
  // (each process has its own buffer file). Inspect opens one letter (its
  // payload and the store's refusal); re-queue and discard ask to be sure
  // first. A re-queued payload drains again: the list is read again at once
  // and a moment later, so a payload the store refuses again shows up anew.

  const BDL_PAGE = 50;
  let bdl = { items: [], cursor: null, total: null, instance: null, pending: null, gen: 0 };

  async function loadBufferDeadLetters({ more = false } = {}) {
    const gen = ++bdl.gen;
    const params = new URLSearchParams({ limit: String(BDL_PAGE) });
    if (more && bdl.cursor) params.set("cursor", bdl.cursor);
    $("bdl-more").disabled = true;
    try {
      const data = await api("GET", `/api/v1/dead-letters?${params}`);
      if (gen !== bdl.gen) return;
      bdl.items = more ? [...bdl.items, ...(data.items || [])] : data.items || [];
      bdl.cursor = data.next_cursor ?? null;
      bdl.total = data.total ?? null;
      bdl.instance = data.instance ?? null;
      $("bdl-card").dataset.state = "listed";
      showText("bdl-error", "");
    } catch (error) {
      if (gen !== bdl.gen || error.status === 401) return;
      showText("bdl-error", error.message);
    } finally {
      $("bdl-more").disabled = false;
    }
    renderBufferDeadLetters();
  }

  function originLabel(origin) {
    if (origin == null) return "–";
    if (typeof origin !== "object") return String(origin);
    const agent = origin.agent_id ? agentLabel(origin.agent_id) : null;
    return [agent, origin.worker_id].filter(Boolean).join(" · ") || JSON.stringify(origin);
  }

  function renderBufferDeadLetters() {
    const now = serverNow();
    const where = bdl.instance ? ` in ${bdl.instance.name}'s buffer` : "";
    $("bdl-hint").textContent =
      bdl.total == null
        ? "payloads the store refused, set aside by this instance's drain"
        : `${fmtInt(bdl.items.length)} of ${fmtInt(bdl.total)}${where}, newest first`;
    $("bdl-table").tBodies[0].replaceChildren(
      ...bdl.items.map((letter) => {
        const failed = parseTime(letter.failed_at);
        const button = (text, cls, onclick) =>
          el("button", { class: `btn small ${cls}`, type: "button", text, onclick });
        return el(
          "tr",
          { dataset: { id: String(letter.id) } },
          el("td", { class: "num mono", text: String(letter.id) }),
          el("td", {
            class: "num",
            title: letter.failed_at,
            dataset: { ago: failed ?? "" },
            text: ago(failed, now),
          }),
          el("td", { class: "mono", text: letter.source }),
          el("td", { text: originLabel(letter.origin) }),
          el("td", { class: "num", text: fmtInt(letter.body_bytes) }),
          el("td", { class: "error-excerpt" }, el("pre", { class: "code", text: letter.error })),
          el(
            "td",
            { class: "num nowrap" },
            button("Inspect", "bdl-inspect", () => inspectDeadLetter(letter.id)),
            " ",
            button("Re-queue", "bdl-requeue", () => askDeadLetter("requeue", letter.id)),
            " ",
            button("Discard", "bdl-discard", () => askDeadLetter("discard", letter.id)),
          ),
        );
      }),
    );
    $("bdl-empty").hidden = bdl.items.length > 0 || $("bdl-card").dataset.state !== "listed";
    $("bdl-more").hidden = !bdl.cursor;
  }

  async function inspectDeadLetter(id) {
    showText("bdl-error", "");
    try {
      const letter = await api("GET", `/api/v1/dead-letters/${encodeURIComponent(id)}`);
      $("bdl-detail-title").textContent = `Dead letter ${letter.id}`;
      $("bdl-detail-hint").textContent =
        `${letter.source}, received ${letter.received_at}, set aside ${letter.failed_at}` +
        (letter.origin ? `; from ${originLabel(letter.origin)}` : "");
      $("bdl-detail-error").textContent = letter.error;
      let body = letter.body;
      if (letter.body_encoding === "utf-8") {
        try {
          body = JSON.stringify(JSON.parse(body), null, 2);
        } catch {
          /* shown as sent */
        }
      }
      $("bdl-detail-body-label").textContent =
        `Payload (${letter.body_encoding}, ${fmtInt(letter.body_bytes)} bytes` +
        (letter.body_truncated ? `; the first ${fmtInt(letter.body.length)} shown` : "") +
        ")";
      $("bdl-detail-body").textContent = body;
      $("bdl-detail").dataset.id = String(letter.id);
      $("bdl-detail").hidden = false;
      $("bdl-detail").scrollIntoView({ block: "nearest" });
    } catch (error) {
      if (error.status !== 401) showText("bdl-error", error.message);
    }
  }

  function askDeadLetter(action, id) {
    bdl.pending = { action, id };
    $("bdl-text").textContent =
      action === "requeue"
        ? `Re-queue dead letter ${id}? Its payload goes back to the drain; ` +
          "if the store refuses it again, it is set aside again."
        : `Discard dead letter ${id}? Its payload is deleted for good.`;
    $("bdl-confirm").textContent = action === "requeue" ? "Re-queue" : "Discard";
    $("bdl-confirm").classList.toggle("danger-fill", action === "discard");
    $("bdl-panel").hidden = false;
    $("bdl-confirm").focus();
  }

  async function settleDeadLetter() {
    const asked = bdl.pending;
    if (!asked) return;
    bdl.pending = null;
    $("bdl-panel").hidden = true;
    showText("bdl-error", "");
    try {
      const path = `/api/v1/dead-letters/${encodeURIComponent(asked.id)}/${asked.action}`;
      const done = await api("POST", path, {});
      if (asked.action === "requeue") {
        const row = done.requeued[0];
        showText("bdl-result", `Re-queued dead letter ${row.id} (buffer row ${row.row_id}).`);
        setTimeout(() => route.view === "dead-letters" && loadBufferDeadLetters(), 3000);
      } else {
        showText("bdl-result", `Discarded dead letter ${asked.id}.`);
      }
      if ($("bdl-detail").dataset.id === String(asked.id)) $("bdl-detail").hidden = true;
    } catch (error) {
      if (error.status !== 401) showText("bdl-error", error.message);
    }
    loadBufferDeadLetters();
  }

  $("bdl-confirm").addEventListener("click", settleDeadLetter);
  $("bdl-cancel").addEventListener("click", () => {
    bdl.pending = null;
    $("bdl-panel").hidden = true;
  });
  $("bdl-refresh").addEventListener("click", () => loadBufferDeadLetters());
  $("bdl-more").addEventListener("click", () => loadBufferDeadLetters({ more: true }));
  $("bdl-detail-close").addEventListener("click", () => {
    $("bdl-detail").hidden = true;
  });

  // -- the task registry (on #/workers): what each worker's registry_delta frames left -----------

  const registry = { items: [], cursor: null, gen: 0 };

  async function loadRegistry({ more = false } = {}) {
    const gen = ++registry.gen;
    const params = new URLSearchParams({ limit: "50" });
    if (more && registry.cursor) params.set("cursor", registry.cursor);
    $("registry-more").disabled = true;
    try {
      const data = await api("GET", `/api/v1/task-registry?${params}`);
      if (gen !== registry.gen) return;
      registry.items = more ? [...registry.items, ...(data.items || [])] : data.items || [];
      registry.cursor = data.next_cursor ?? null;
      showText("registry-error", "");
    } catch (error) {
      if (gen !== registry.gen || error.status === 401) return;
      showText("registry-error", error.message);
    } finally {
      $("registry-more").disabled = false;
    }
    renderRegistry();
  }

  function renderRegistry() {
    const rows = [];
    for (const worker of registry.items) {
      for (const [engine, tasks] of Object.entries(worker.engines || {})) {
        const names = tasks.map((task) => String(task.name ?? "?"));
        rows.push(
          el(
            "tr",
            { dataset: { agent: worker.agent_id, worker: worker.worker_id, engine } },
            el("td", { text: agentLabel(worker.agent_id) }),
            el("td", { class: "mono", text: worker.worker_id }),
            el("td", { text: engine }),
            el("td", { class: "num", text: fmtInt(names.length) }),
            el(
              "td",
              { class: "registry-tasks" },
              tasks.map((task) =>
                el("span", {
                  class: "pill mono",
                  title: JSON.stringify(task),
                  text: String(task.name ?? "?"),
                }),
              ),
            ),
          ),
        );
      }
    }
    $("registry-table").tBodies[0].replaceChildren(...rows);
    $("registry-empty").hidden = rows.length > 0;
    $("registry-more").hidden = !registry.cursor;
  }

  $("registry-refresh").addEventListener("click", () => loadRegistry());
  $("registry-more").addEventListener("click", () => loadRegistry({ more: true }));

  // -- #/audit: who changed what, with filters and keyset pages ----------------------------------

  const AUDIT_FILTER_INPUTS = {
    actor: "af-actor",
    action: "af-action",
    subject: "af-target",
    outcome: "af-outcome",
    project_id: "af-project",
    since: "af-since",
    until: "af-until",
  };
  const audit = { items: [], cursor: null, gen: 0 };

  function auditQuery() {
    const params = new URLSearchParams({ limit: "50" });
    for (const [name, id] of Object.entries(AUDIT_FILTER_INPUTS)) {
      const value = $(id).value.trim();
      if (!value) continue;
      // datetime-local is the browser's local time: the API wants an instant.
      params.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : value);
    }
    return params;
  }

  // The projects the page knows of (from its agents), for the project filter.
  function renderAuditProjects() {
    const select = $("af-project");
    const previous = select.value;
    const names = new Map();
    for (const agent of agents.values()) {
      if (agent.project_id) names.set(String(agent.project_id), agent.project || agent.project_id);
    }
    select.replaceChildren(
      el("option", { value: "", text: "any project" }),
      ...[...names]
        .sort((a, b) => String(a[1]).localeCompare(String(b[1])))
        .map(([id, name]) => el("option", { value: id, text: name })),
    );
    if (previous && !names.has(previous)) select.append(el("option", { value: previous }));
    select.value = previous;
  }

  async function loadAudit({ more = false } = {}) {
    if (!more) renderAuditProjects();
    const gen = ++audit.gen;
    const params = auditQuery();
    if (more && audit.cursor) params.set("cursor", audit.cursor);
    $("audit-more").disabled = true;
    try {
      const data = await api("GET", `/api/v1/audit?${params}`);
      if (gen !== audit.gen) return;
      audit.items = more ? [...audit.items, ...(data.items || [])] : data.items || [];
      audit.cursor = data.next_cursor ?? null;
      $("audit-card").dataset.state = "listed";
      params.delete("cursor");
      $("audit-card").dataset.query = params.toString(); // what the list shows
      showText("audit-error", "");
    } catch (error) {
      if (gen !== audit.gen || error.status === 401) return;
      showText("audit-error", error.message);
    } finally {
      $("audit-more").disabled = false;
    }
    renderAudit();
  }

  function renderAudit() {
    $("audit-table").tBodies[0].replaceChildren(
      ...audit.items.map((row) => {
        const details = { ...(row.details || {}) };
        const outcome = details.outcome;
        delete details.outcome;
        return el(
          "tr",
          { dataset: { id: String(row.id), action: row.action } },
          el("td", { class: "nowrap", title: row.at, text: new Date(row.at).toLocaleString() }),
          el("td", { class: "mono audit-actor", text: row.actor ?? "–" }),
          el(
            "td",
            { class: "mono" },
            row.action,
            outcome && outcome !== "ok"
              ? el("span", { class: "pill bad", text: String(outcome) })
              : null,
          ),
          el("td", { class: "mono trunc", title: row.subject, text: row.subject }),
          el("td", { class: "mono trunc", title: JSON.stringify(details), text: preview(details) }),
        );
      }),
    );
    $("audit-empty").hidden = audit.items.length > 0 || $("audit-card").dataset.state !== "listed";
    $("audit-more").hidden = !audit.cursor;
  }

  // Typing reloads the list once it pauses, and only when the filters changed
  // (a field losing focus as "Older" is clicked must not undo that page).
  const reloadAuditSoon = throttle(() => {
    if (route.view === "audit" && auditQuery().toString() !== $("audit-card").dataset.query)
      loadAudit();
  }, 300);
  $("audit-filters").addEventListener("input", reloadAuditSoon);
  $("audit-filters").addEventListener("change", reloadAuditSoon);
  $("audit-filters").addEventListener("submit", (event) => event.preventDefault());
  $("af-clear").addEventListener("click", () => {
    for (const id of Object.values(AUDIT_FILTER_INPUTS)) $(id).value = "";
    loadAudit();
  });
  $("audit-refresh").addEventListener("click", () => loadAudit());
  $("audit-more").addEventListener("click", () => loadAudit({ more: true }));

  window.z4jDashboard = {
    api,
    el,
    fill,
    showText,
    when,
    ago,
    parseTime,
    fmtInt,
    agentSearchText,
  };
  mark("instances", "agents", "feed", "kinds", "commands", "kpis", "charts");
  showRoute();
  refreshAll();
  connect();
})();
