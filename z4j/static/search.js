// z4j dashboard: the event search page (#/search), beside app.js.
//
// app.js shows and hides the page (its VIEWS); this file fills it. One set
// of filters drives three reads of the same API filter: a page of events
// (/api/v1/events, newest first, "Older" follows the page's cursor), the
// time histogram (/api/v1/events/histogram, drawn as SVG bars) and the two
// export links (/api/v1/events/export, NDJSON or CSV, streamed by the
// brain and saved by the browser as a download).
//
// A text search reads a bounded number of rows per page on the brain, so a
// page can come back short, even empty, and still have older rows to read:
// the hint says so and "Older" goes on. Everything from the server is put
// in the page with textContent, never as HTML. A 401 means the session is
// gone: back to /login.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const BODY_PREVIEW = 240; // characters of a body shown in its cell
  const HIST_W = 1000;
  const HIST_H = 120;

  const state = {
    params: null, // the filter of the results shown (URLSearchParams)
    cursor: null,
    shown: 0,
    gen: 0, // bumped by each search: answers to older ones are dropped
    choices: false, // the project and agent lists are filled
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function getJson(path) {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { accept: "application/json" },
    });
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
    return /^#\/?search(\/|\?|$)/.test(location.hash);
  }

  // -- filters -----------------------------------------------------------------

  function localToIso(value) {
    if (!value) return "";
    const at = new Date(value); // a datetime-local value is local time
    return Number.isNaN(at.getTime()) ? "" : at.toISOString();
  }

  function filterParams() {
    const params = new URLSearchParams();
    const add = (name, value) => {
      if (value) params.set(name, value);
    };
    add("project_id", $("sf-project").value);
    add("agent_id", $("sf-agent").value);
    add("worker_id", $("sf-worker").value.trim());
    add("kind", $("sf-kind").value.trim());
    add("since", localToIso($("sf-since").value));
    add("until", localToIso($("sf-until").value));
    add("q", $("sf-q").value);
    return params;
  }

  function setExportLinks(params) {
    for (const format of ["ndjson", "csv"]) {
      const query = new URLSearchParams(params);
      query.set("format", format);
      $(`search-export-${format}`).href = `/api/v1/events/export?${query}`;
    }
  }

  async function fillChoices() {
    if (state.choices) return;
    state.choices = true;
    try {
      const [projects, agents] = await Promise.all([
        getJson("/api/v1/projects"),
        getJson("/api/v1/agents"),
      ]);
      const names = new Map();
      for (const p of projects.items) {
        names.set(p.id, p.name);
        $("sf-project").append(new Option(p.name, p.id));
      }
      for (const a of agents.items) {
        const project = a.project ?? names.get(a.project_id) ?? "";
        $("sf-agent").append(new Option(project ? `${project} / ${a.name}` : a.name, a.id));
      }
    } catch (err) {
      state.choices = false; // try again next time
      showError(err);
    }
  }

  // -- results -----------------------------------------------------------------

  function showError(err) {
    const box = $("search-error");
    if (err) {
      box.textContent = err.message || String(err);
      box.hidden = false;
    } else {
      box.hidden = true;
    }
  }

  function timeText(iso) {
    const at = new Date(iso);
    return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
  }

  function cell(text, className, title) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    if (title) td.title = title;
    return td;
  }

  function agentText(event) {
    if (!event.agent_id) return "";
    const option = [...$("sf-agent").options].find((o) => o.value === event.agent_id);
    const agent = option ? option.textContent : event.agent_id.slice(0, 8);
    return event.worker_id ? `${agent} · ${event.worker_id}` : agent;
  }

  function bodyText(event) {
    if (event.body_truncated) return `(a body of ${event.body_bytes} bytes: see the export)`;
    const text = JSON.stringify(event.body);
    return text.length > BODY_PREVIEW ? `${text.slice(0, BODY_PREVIEW)}…` : text;
  }

  function addRows(items) {
    const body = $("search-table").tBodies[0];
    for (const event of items) {
      const tr = document.createElement("tr");
      tr.dataset.id = String(event.id);
      tr.dataset.kind = event.kind;
      tr.append(
        cell(timeText(event.received_at), "num", event.received_at),
        cell(event.kind, "mono"),
        cell(event.source),
        cell(agentText(event)),
        cell(bodyText(event), "mono body-cell"),
      );
      body.append(tr);
    }
    state.shown += items.length;
  }

  function showHint() {
    const older = state.cursor ? "; Older reads on" : "";
    const scanned = state.cursor && state.params.has("q") ? " (a text search reads in steps)" : "";
    $("search-hint").textContent = `${state.shown} shown, newest first${older}${scanned}`;
    $("search-empty").hidden = state.shown > 0 || Boolean(state.cursor);
    $("search-older").hidden = !state.cursor;
  }

  async function readPage(gen) {
    const query = new URLSearchParams(state.params);
    query.set("limit", $("sf-limit").value);
    if (state.cursor) query.set("cursor", state.cursor);
    const data = await getJson(`/api/v1/events?${query}`);
    if (gen !== state.gen) return;
    addRows(data.items);
    state.cursor = data.next_cursor ?? null;
    showHint();
  }

  // -- histogram ---------------------------------------------------------------

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    return node;
  }

  function drawHistogram(data) {
    const chart = $("search-histogram");
    chart.replaceChildren();
    chart.setAttribute("viewBox", `0 0 ${HIST_W} ${HIST_H}`);
    chart.setAttribute("preserveAspectRatio", "none");
    const buckets = data.buckets;
    const most = Math.max(1, ...buckets.map((b) => b.count));
    const width = HIST_W / Math.max(1, buckets.length);
    buckets.forEach((bucket, i) => {
      const height = bucket.count ? Math.max(2, (bucket.count / most) * (HIST_H - 4)) : 0;
      const bar = svg("rect", {
        class: "bar",
        x: i * width + width * 0.1,
        y: HIST_H - height,
        width: width * 0.8,
        height,
        "data-count": bucket.count,
        "data-start": bucket.start,
      });
      const title = svg("title", {});
      title.textContent = `${timeText(bucket.start)}: ${bucket.count}`;
      bar.append(title);
      chart.append(bar);
    });
    const total = buckets.reduce((sum, b) => sum + b.count, 0);
    const span = `${timeText(data.since)} – ${timeText(data.until)}`;
    const seconds = data.bucket_seconds;
    const per = seconds >= 60 ? `${seconds / 60} min` : `${seconds} s`;
    let hint = `${total} events, ${span}, bars of ${per}`;
    if (!data.complete) hint += ` (counted from ${timeText(data.counted_since)} on)`;
    $("search-histogram-hint").textContent = hint;
    $("search-histogram-hint").dataset.total = String(total);
  }

  async function readHistogram(gen) {
    const data = await getJson(`/api/v1/events/histogram?${state.params}`);
    if (gen === state.gen) drawHistogram(data);
  }

  // -- the page ----------------------------------------------------------------

  async function search() {
    const gen = ++state.gen;
    state.params = filterParams();
    state.cursor = null;
    state.shown = 0;
    setExportLinks(state.params);
    $("search-table").tBodies[0].replaceChildren();
    $("search-older").hidden = true;
    $("search-hint").textContent = "searching…";
    showError(null);
    const done = await Promise.allSettled([readPage(gen), readHistogram(gen)]);
    const failed = done.find((d) => d.status === "rejected");
    if (failed && gen === state.gen) showError(failed.reason);
  }

  async function older() {
    const gen = state.gen;
    $("search-older").disabled = true;
    try {
      await readPage(gen);
    } catch (err) {
      showError(err);
    } finally {
      $("search-older").disabled = false;
    }
  }

  async function show() {
    if (!onPage()) return;
    await fillChoices();
    if (state.params === null) search();
  }

  function start() {
    $("search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      search();
    });
    $("search-older").addEventListener("click", older);
    window.addEventListener("hashchange", show);
    show();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
