// z4j dashboard: the Projects (#/projects) and Agents (#/agents) pages.
//
// Provisioning without a shell on the brain's host: projects created,
// listed and archived, agents created (their token, the signing secret and
// a z4j-bare configuration shown once), listed with their workers, revoked,
// their tokens rotated, a project's signing secret rotated. A rotation keeps
// the old credential working for a grace (seconds, asked with the
// confirmation), so live agents are not cut off. Every destructive action
// waits for a confirmation. app.js routes here and lends its helpers
// (window.z4jDashboard); this file keeps to its own two views.
(() => {
  "use strict";

  const { api, el, fill, showText, when, ago, parseTime, fmtInt, agentSearchText } =
    window.z4jDashboard;
  const $ = (id) => document.getElementById(id);
  const DEFAULT_GRACE_SECONDS = 86400; // the brain's own default is Z4J_ROTATION_GRACE_SECONDS

  // The Agents page lists PAGE agents that match its filter, and PAGE more at
  // each "More": a brain may have tens of thousands.
  const PAGE = 100;
  const state = { projects: [], agents: [], gen: 0, pending: null, shown: PAGE };

  async function load() {
    const gen = ++state.gen;
    try {
      const [projects, agents] = await Promise.all([
        api("GET", "/api/v1/projects"),
        api("GET", "/api/v1/agents"),
      ]);
      if (gen !== state.gen) return;
      state.projects = projects.items || [];
      state.agents = agents.items || [];
      showText("projects-error", "");
      showText("prov-agents-error", "");
    } catch (error) {
      if (gen !== state.gen || error.status === 401) return;
      showText("projects-error", error.message);
      showText("prov-agents-error", error.message);
      return;
    }
    render();
  }

  function render() {
    renderProjects();
    renderAgents();
  }

  // -- projects -----------------------------------------------------------------------------------

  function renderProjects() {
    const counts = new Map();
    for (const a of state.agents) {
      if (!a.revoked) counts.set(a.project_id, (counts.get(a.project_id) || 0) + 1);
    }
    fill(
      $("projects-table").tBodies[0],
      state.projects.map((p) =>
        el(
          "tr",
          { dataset: { project: p.name, projectId: p.id } },
          el("td", { text: p.name }),
          el("td", { class: "mono", text: p.id }),
          el("td", { class: "num", text: fmtInt(counts.get(p.id) || 0) }),
          el("td", {}, secretText(p)),
          el(
            "td",
            { dataset: { field: "state" } },
            p.archived_at
              ? el("span", { class: "pill", text: "archived" })
              : el("span", { class: "pill ok", text: "active" }),
          ),
          el(
            "td",
            { class: "task-actions" },
            p.archived_at
              ? null
              : [
                  button("rotate-secret", "Rotate secret", () => askRotateSecret(p)),
                  button("archive", "Archive", () => askArchive(p), "danger"),
                ],
          ),
        ),
      ),
    );
    $("projects-empty").hidden = state.projects.length > 0;
    const select = $("agent-project");
    const chosen = select.value;
    fill(
      select,
      state.projects
        .filter((p) => !p.archived_at)
        .map((p) => el("option", { value: p.name, text: p.name, selected: p.name === chosen })),
    );
  }

  function secretText(p) {
    const text = `generation ${p.secret_generation}`;
    const until = parseTime(p.previous_secret_expires_at);
    if (until == null || until <= Date.now()) return text;
    const previous = when(p.previous_secret_expires_at);
    return [text, el("span", { class: "muted" }, " · previous until ", previous)];
  }

  function button(action, label, onclick, cls = "") {
    const props = { class: `btn small ${cls}`, type: "button", dataset: { action }, onclick };
    return el("button", props, label);
  }

  function askArchive(p) {
    ask(
      "project",
      `Archive the project “${p.name}”? Its agents are revoked (their live connections close) ` +
        "and it takes no new ones. This cannot be undone.",
      null,
      async () => {
        await api("POST", `/api/v1/projects/${encodeURIComponent(p.id)}/archive`);
      },
    );
  }

  function askRotateSecret(p) {
    ask(
      "project",
      `Rotate the signing secret of “${p.name}”? Its agents keep streaming on the previous ` +
        "secret for the grace below; give them the new one (shown next) before it ends.",
      DEFAULT_GRACE_SECONDS,
      async (grace) => {
        const data = await api(
          "POST",
          `/api/v1/projects/${encodeURIComponent(p.id)}/rotate-secret`,
          { grace_seconds: grace },
        );
        $("secret-shown-project").textContent = p.name;
        fill($("secret-shown-until"), when(data.previous_secret_expires_at));
        $("secret-shown-value").textContent = data.signing_secret;
        $("secret-shown").hidden = false;
      },
    );
  }

  $("project-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("project-name").value.trim();
    if (!name) {
      showText("projects-error", "Name the project.");
      return;
    }
    await act("projects-error", $("project-create"), async () => {
      await api("POST", "/api/v1/projects", { name });
      $("project-name").value = "";
    });
  });
  $("secret-shown-dismiss").addEventListener("click", () => {
    $("secret-shown-value").textContent = "";
    $("secret-shown").hidden = true;
  });

  // -- agents -------------------------------------------------------------------------------------

  function renderAgents() {
    const now = Date.now();
    const filter = $("prov-agents-filter").value.trim().toLowerCase();
    const matching = filter
      ? state.agents.filter((a) => agentSearchText(a).includes(filter))
      : state.agents;
    const shown = matching.slice(0, state.shown);
    fill(
      $("prov-agents-table").tBodies[0],
      shown.map((a) => {
        const live = (a.workers || []).filter((w) => w.connected);
        const seen = parseTime(a.last_seen);
        const grace = parseTime(a.token_grace_until);
        return el(
          "tr",
          { dataset: { agent: a.name, agentId: a.id, project: a.project ?? "" } },
          el("td", { text: a.name }),
          el("td", { text: a.project ?? "–" }),
          el(
            "td",
            { dataset: { field: "state" } },
            a.revoked
              ? el("span", { class: "pill bad", text: "revoked" })
              : el("span", {
                  class: live.length ? "pill ok" : "pill",
                  text: live.length ? "connected" : "offline",
                }),
          ),
          el("td", { class: "num", dataset: { field: "workers" }, text: `${live.length}` }),
          el("td", {
            class: "mono",
            dataset: { field: "versions" },
            text: (a.versions || []).join(", ") || "–",
          }),
          el(
            "td",
            { class: "num", dataset: { field: "last-seen" } },
            seen == null ? "–" : ago(seen, now),
          ),
          el(
            "td",
            { dataset: { field: "grace" } },
            grace != null && grace > now ? when(a.token_grace_until) : "–",
          ),
          el(
            "td",
            { class: "task-actions" },
            a.revoked
              ? null
              : [
                  button("rotate-token", "Rotate token", () => askRotateToken(a)),
                  button("revoke", "Revoke", () => askRevoke(a), "danger"),
                ],
          ),
        );
      }),
    );
    $("prov-agents-empty").hidden = state.agents.length > 0;
    $("prov-agents-more").hidden = shown.length >= matching.length;
    const total = state.agents.length;
    const all = `${fmtInt(total)} agent${total === 1 ? "" : "s"}`;
    $("prov-agents-hint").textContent = !total
      ? "their tokens, workers and versions"
      : filter
        ? `${fmtInt(matching.length)} of ${all} match` +
          (shown.length < matching.length ? `, ${fmtInt(shown.length)} shown` : "")
        : shown.length < total
          ? `${all}, ${fmtInt(shown.length)} shown`
          : all;
  }

  $("prov-agents-filter").addEventListener("input", () => {
    state.shown = PAGE;
    renderAgents();
  });
  $("prov-agents-more").addEventListener("click", () => {
    state.shown += PAGE;
    renderAgents();
  });

  function askRevoke(a) {
    ask(
      "agent",
      `Revoke the agent “${a.name}” of ${a.project}? Its tokens stop working and its live ` +
        "connections close. This cannot be undone.",
      null,
      async () => {
        await api("POST", `/api/v1/agents/${encodeURIComponent(a.id)}/revoke`);
      },
    );
  }

  function askRotateToken(a) {
    ask(
      "agent",
      `Rotate the token of “${a.name}”? The old token keeps working for the grace below; ` +
        "configure the agent with the new one (shown next) before it ends.",
      DEFAULT_GRACE_SECONDS,
      async (grace) => {
        const data = await api("POST", `/api/v1/agents/${encodeURIComponent(a.id)}/rotate-token`, {
          grace_seconds: grace,
          brain_url: location.origin,
        });
        showCredentials(`New token for ${a.name}.`, data);
      },
    );
  }

  function showCredentials(title, data) {
    $("agent-shown-title").textContent = title;
    $("agent-shown-config").textContent = data.config;
    $("agent-shown-token").textContent = data.token;
    $("agent-shown-secret").textContent = data.signing_secret;
    $("agent-shown").hidden = false;
  }

  $("agent-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const project = $("agent-project").value;
    const name = $("agent-name").value.trim();
    if (!project || !name) {
      showText("prov-agents-error", project ? "Name the agent." : "Create a project first.");
      return;
    }
    await act("prov-agents-error", $("agent-create"), async () => {
      const data = await api("POST", "/api/v1/agents", {
        project,
        name,
        brain_url: location.origin,
      });
      $("agent-name").value = "";
      showCredentials(`Agent ${name} of ${project} created.`, data);
    });
  });
  $("agent-shown-dismiss").addEventListener("click", () => {
    for (const id of ["agent-shown-config", "agent-shown-token", "agent-shown-secret"]) {
      $(id).textContent = "";
    }
    $("agent-shown").hidden = true;
  });

  // -- confirmations ------------------------------------------------------------------------------

  // One pending action per page ("project" or "agent"): its text, a grace
  // input when it is a rotation, and what Confirm does with that grace.
  function ask(page, text, grace, run) {
    state.pending = { page, run };
    $(`${page}-confirm-text`).textContent = text;
    $(`${page}-grace-label`).hidden = grace == null;
    if (grace != null) $(`${page}-grace`).value = String(grace);
    $(`${page}-confirm`).hidden = false;
    $(`${page}-confirm-go`).focus();
  }

  function cancel(page) {
    if (state.pending && state.pending.page === page) state.pending = null;
    $(`${page}-confirm`).hidden = true;
  }

  for (const page of ["project", "agent"]) {
    $(`${page}-confirm-cancel`).addEventListener("click", () => cancel(page));
    $(`${page}-confirm-go`).addEventListener("click", async (event) => {
      const pending = state.pending;
      if (!pending || pending.page !== page) return;
      const errors = page === "agent" ? "prov-agents-error" : "projects-error";
      let grace = null;
      if (!$(`${page}-grace-label`).hidden) {
        grace = Number($(`${page}-grace`).value);
        if (!Number.isInteger(grace) || grace < 0) {
          showText(errors, "The grace is a whole number of seconds, 0 or more.");
          return;
        }
      }
      cancel(page);
      await act(errors, event.currentTarget, () => pending.run(grace));
    });
  }

  // Run a change, show its error, then read both lists again.
  async function act(errors, control, run) {
    control.disabled = true;
    showText(errors, "");
    try {
      await run();
    } catch (error) {
      if (error.status !== 401) showText(errors, error.message);
    } finally {
      control.disabled = false;
    }
    await load();
  }

  $("projects-refresh").addEventListener("click", load);
  $("prov-agents-refresh").addEventListener("click", load);

  function open() {
    showText("projects-error", "");
    showText("prov-agents-error", "");
    load();
  }

  window.z4jProvisioning = { open, refresh: load };
  // app.js showed the route before this file ran: open it now if it is ours.
  const first = location.hash.replace(/^#\/?/, "").split(/[/?]/)[0];
  if (first === "projects" || first === "agents") open();
})();
