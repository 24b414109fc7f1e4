// z4j dashboard: the federated view (#/regions), beside app.js.
//
// app.js shows and hides the page (its VIEWS); this file fills it from the
// hub's API: every region's state (/api/v1/federation/regions), agents
// across regions newest first (/api/v1/federation/agents, "More agents"
// follows the merged cursor) and events merged by time
// (/api/v1/federation/events, "Older" likewise). Every row names its
// region. When a region did not answer, the page says so (partial), never
// showing less as if it were all.
//
// A command to another region's agent is sent only after the operator
// types that region's name (the API's confirm_region): the region decides
// too, and both audit it. Everything from the server is put in the page
// with textContent, never as HTML. A 401 means the session is gone.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const BODY_PREVIEW = 160;
  const REFRESH_MS = 5000;

  const state = {
    cursor: null,
    agentCursor: null,
    paged: false, // the operator brought more rows: the timer leaves the tables be
    timer: 0,
    gen: 0,
    target: null,
    local: null,
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === "z4j_csrf") return rest.join("=");
    }
    return "";
  }

  async function call(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { accept: "application/json" } };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.headers["x-csrf-token"] = csrfToken();
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      location.replace("/login");
      throw new ApiError(401, "signed out");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      /* not JSON */
    }
    if (!response.ok) {
      throw new ApiError(
        response.status,
        (data && data.message) || `The brain answered ${response.status}.`,
      );
    }
    return data;
  }

  function onPage() {
    return /^#\/?regions(\/|\?|$)/.test(location.hash);
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text ?? "";
    if (className) td.className = className;
    return td;
  }

  function when(iso) {
    if (!iso) return "";
    const at = new Date(iso);
    return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
  }

  function number(value, digits = 0) {
    return typeof value === "number" ? value.toFixed(digits) : "";
  }

  function regionTag(name) {
    const tag = document.createElement("span");
    tag.className = "tag region-tag";
    tag.dataset.region = name;
    tag.textContent = name;
    return tag;
  }

  // -- partial answers ---------------------------------------------------------

  const missing = new Map(); // region -> why, over the page's last reads

  function notePartial(answer) {
    for (const name of answer.unreachable || []) {
      missing.set(name, (answer.errors || {})[name] || "no answer");
    }
  }

  function showPartial() {
    const box = $("regions-partial");
    if (!missing.size) {
      box.hidden = true;
      return;
    }
    const parts = [...missing].map(([name, why]) => `${name} (${why})`);
    box.textContent =
      `Partial: ${parts.join(", ")} did not answer. ` +
      "Rows of the regions that answered are shown; theirs are missing.";
    box.hidden = false;
  }

  // -- the three tables --------------------------------------------------------

  function renderRegions(answer) {
    const body = $("regions-table").tBodies[0];
    body.replaceChildren();
    for (const r of answer.items) {
      if (r.local) state.local = r.name;
      const row = body.insertRow();
      row.dataset.region = r.name;
      const name = row.insertCell();
      name.append(regionTag(r.name));
      if (r.local) name.append(" (this brain)");
      const pill = document.createElement("span");
      const ready = r.reachable && r.summary && r.summary.ready;
      pill.className = `pill ${r.reachable ? (ready ? "ok" : "warn") : "bad"}`;
      pill.textContent = r.reachable ? (ready ? "reachable" : "not ready") : "unreachable";
      row.insertCell().append(pill);
      cell(row, r.round_trip_ms == null ? (r.cached ? "cached" : "") : `${r.round_trip_ms} ms`, "num");
      const s = r.summary || {};
      cell(row, s.version, "mono");
      cell(row, number(s.agents_connected), "num");
      cell(row, number(s.workers_connected), "num");
      cell(row, number(s.ingest_rate, 1), "num");
      cell(row, number(s.drain_rate, 1), "num");
      cell(row, number(s.buffer_depth), "num");
      cell(row, r.error || "", "bad-text");
    }
    $("regions-hint").textContent =
      `${answer.items.length} regions; this brain is ${answer.region}`;
  }

  function appendAgents(answer) {
    const body = $("region-agents-table").tBodies[0];
    for (const a of answer.items) {
      const row = body.insertRow();
      row.dataset.region = a.region;
      row.insertCell().append(regionTag(a.region));
      cell(row, a.project);
      cell(row, a.name, "mono");
      const live = a.workers.filter((w) => w.connected).map((w) => w.worker_id);
      cell(row, live.length ? live.join(", ") : "none connected", "mono");
      cell(row, when(a.last_seen));
      const actions = row.insertCell();
      if (a.region !== state.local) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "btn small";
        button.textContent = "Command…";
        button.addEventListener("click", () => askCommand(a));
        actions.append(button);
      }
    }
    $("region-agents-empty").hidden = body.rows.length > 0;
    state.agentCursor = answer.next_cursor;
    $("region-agents-more").hidden = !state.agentCursor;
  }

  function appendEvents(answer) {
    const body = $("region-events-table").tBodies[0];
    for (const e of answer.items) {
      const row = body.insertRow();
      row.dataset.region = e.region;
      cell(row, when(e.received_at));
      row.insertCell().append(regionTag(e.region));
      cell(row, e.kind, "mono");
      cell(row, e.source);
      const text = e.body === null ? "(left out: large)" : JSON.stringify(e.body);
      cell(row, text.length > BODY_PREVIEW ? `${text.slice(0, BODY_PREVIEW)}…` : text, "mono");
    }
    $("region-events-empty").hidden = body.rows.length > 0;
    state.cursor = answer.next_cursor;
    $("region-events-older").hidden = !state.cursor;
  }

  // Every region's state, and the first page of agents and of events; once
  // the operator has brought more of either ("More agents", "Older"), the
  // timer renews the regions' state only, until Refresh starts over.
  async function load() {
    if (!onPage()) return;
    const gen = ++state.gen;
    const tables = !state.paged;
    try {
      const [regions, agents, events] = await Promise.all([
        call("GET", "/api/v1/federation/regions"),
        tables ? call("GET", "/api/v1/federation/agents?limit=100") : null,
        tables ? call("GET", "/api/v1/federation/events?limit=50") : null,
      ]);
      if (gen !== state.gen) return;
      missing.clear();
      for (const answer of [regions, agents, events]) if (answer) notePartial(answer);
      renderRegions(regions);
      if (tables) {
        $("region-agents-table").tBodies[0].replaceChildren();
        appendAgents(agents);
        $("region-events-table").tBodies[0].replaceChildren();
        appendEvents(events);
      }
      showPartial();
      $("regions-error").hidden = true;
    } catch (err) {
      if (gen !== state.gen) return;
      $("regions-error").textContent = err.message;
      $("regions-error").hidden = false;
    }
  }

  // The next page of a table ("Older", "More agents"), appended to it.
  async function nextPage(button, path, cursor, append) {
    if (!cursor) return;
    $(button).disabled = true;
    state.paged = true;
    state.gen++; // a load under way would put the first page back
    try {
      const answer = await call("GET", `${path}&cursor=${encodeURIComponent(cursor)}`);
      notePartial(answer);
      append(answer);
      showPartial();
    } catch (err) {
      $("regions-error").textContent = err.message;
      $("regions-error").hidden = false;
    } finally {
      $(button).disabled = false;
    }
  }

  const older = () =>
    nextPage(
      "region-events-older",
      "/api/v1/federation/events?limit=50",
      state.cursor,
      appendEvents,
    );
  const moreAgents = () =>
    nextPage(
      "region-agents-more",
      "/api/v1/federation/agents?limit=100",
      state.agentCursor,
      appendAgents,
    );

  // -- a command to another region: confirmed by naming it ------------------------

  function askCommand(agent) {
    state.target = agent;
    $("region-command-text").textContent =
      `Send a command to ${agent.name} (${agent.project}) in region ${agent.region}: ` +
      `another region. Type "${agent.region}" to confirm.`;
    $("region-command-region").textContent = agent.region;
    $("region-command-confirm").value = "";
    $("region-command-go").disabled = true;
    $("region-command-result").textContent = "";
    $("region-command").hidden = false;
    $("region-command-confirm").focus();
  }

  async function sendCommand() {
    const agent = state.target;
    const typed = $("region-command-confirm").value.trim();
    if (!agent || typed !== agent.region) return;
    $("region-command-go").disabled = true;
    const result = $("region-command-result");
    try {
      const sent = await call(
        "POST",
        `/api/v1/federation/regions/${encodeURIComponent(agent.region)}/commands`,
        {
          agent: agent.id,
          action: $("region-command-action").value.trim(),
          confirm_region: typed,
        },
      );
      result.textContent = `Sent to ${sent.region}: command ${sent.command.id} (${sent.command.state}).`;
      result.dataset.commandId = sent.command.id;
    } catch (err) {
      result.textContent = `Refused: ${err.message}`;
      $("region-command-go").disabled = false;
    }
  }

  // -- the page ----------------------------------------------------------------

  function show() {
    clearInterval(state.timer);
    state.timer = 0;
    if (!onPage()) return;
    state.paged = false;
    load();
    state.timer = setInterval(() => {
      if ($("region-command").hidden) load();
    }, REFRESH_MS);
  }

  function start() {
    $("regions-refresh").addEventListener("click", () => {
      state.paged = false;
      load();
    });
    $("region-events-older").addEventListener("click", older);
    $("region-agents-more").addEventListener("click", moreAgents);
    $("region-command-confirm").addEventListener("input", () => {
      const agent = state.target;
      $("region-command-go").disabled =
        !agent || $("region-command-confirm").value.trim() !== agent.region;
    });
    $("region-command-go").addEventListener("click", sendCommand);
    $("region-command-cancel").addEventListener("click", () => {
      $("region-command").hidden = true;
      state.target = null;
    });
    window.addEventListener("hashchange", show);
    show();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
