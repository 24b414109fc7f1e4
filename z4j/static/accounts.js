// z4j dashboard, accounts: who is signed in (top bar), #/users (admins:
// create, disable, enable, set a password) and #/tokens (personal API tokens:
// create, shown once; list with last use; revoke; an admin may list
// everyone's and the legacy admin tokens). app.js routes the hash here
// (window.z4jAccounts.show). Everything from the server goes in with
// textContent, never as HTML; any 401 goes back to /login.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let me = null; // GET /api/v1/session
  let current = null; // the view shown: "users" or "tokens"

  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === "z4j_csrf") return rest.join("=");
    }
    return "";
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { accept: "application/json" } };
    if (method !== "GET") {
      init.headers["content-type"] = "application/json";
      init.headers["x-csrf-token"] = csrfToken();
    }
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401) {
      location.replace("/login");
      throw new Error("signed out");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      /* no body */
    }
    if (!response.ok) {
      const error = new Error((data && data.message) || `The brain answered ${response.status}.`);
      error.status = response.status;
      error.code = data && data.error;
      throw error;
    }
    return data;
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value == null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  function when(iso) {
    if (!iso) return "–";
    const at = new Date(iso);
    return Number.isNaN(at.getTime()) ? "–" : at.toLocaleString();
  }

  function show(id, text) {
    $(id).textContent = text || "";
    $(id).hidden = !text;
  }

  const isAdmin = () => me != null && me.role === "admin" && (me.scope == null || me.scope === "admin");

  async function whoami() {
    try {
      me = await api("GET", "/api/v1/session");
    } catch {
      return;
    }
    $("whoami").textContent = `${me.name} · ${me.role}`;
    $("nav-users").hidden = !isAdmin();
    $("tokens-all-label").hidden = !isAdmin();
    if (me.kind === "legacy_token") {
      $("tokens-all").checked = true;
      $("tokens-all").disabled = true;
    }
  }

  // -- #/users -------------------------------------------------------------------

  let passwordFor = null; // the user whose password the form sets

  async function loadUsers() {
    show("users-error", "");
    let users;
    try {
      users = (await api("GET", "/api/v1/users")).items;
    } catch (error) {
      show("users-error", error.message);
      return;
    }
    const body = $("users-table").tBodies[0];
    body.replaceChildren(
      ...users.map((user) => {
        const projects = user.projects == null ? "all" : user.projects.map((p) => p.name ?? p.id).join(", ");
        const toggle = el("button", {
          class: "btn small",
          type: "button",
          text: user.disabled ? "Enable" : "Disable",
          onclick: () => setDisabled(user, !user.disabled),
        });
        const password = el("button", {
          class: "btn small",
          type: "button",
          text: "Set password",
          onclick: () => openPassword(user),
        });
        return el(
          "tr",
          { "data-user": user.name },
          el("td", { text: user.name }),
          el("td", { text: user.role }),
          el("td", { text: projects }),
          el("td", { class: "user-state", text: user.disabled ? "disabled" : "active" }),
          el("td", { class: "num", text: when(user.created_at) }),
          el("td", { class: "task-actions" }, toggle, password),
        );
      }),
    );
  }

  async function setDisabled(user, disabled) {
    try {
      await api("POST", `/api/v1/users/${user.id}/${disabled ? "disable" : "enable"}`, {});
    } catch (error) {
      show("users-error", error.message);
    }
    loadUsers();
  }

  function openPassword(user) {
    passwordFor = user;
    $("password-title").textContent = `Set the password of ${user.name}`;
    $("password-new").value = "";
    show("password-error", "");
    $("password-form").hidden = false;
    $("password-new").focus();
  }

  $("password-cancel").addEventListener("click", () => {
    passwordFor = null;
    $("password-form").hidden = true;
  });

  $("password-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!passwordFor) return;
    try {
      await api("POST", `/api/v1/users/${passwordFor.id}/password`, {
        password: $("password-new").value,
      });
    } catch (error) {
      show("password-error", error.message);
      return;
    }
    passwordFor = null;
    $("password-form").hidden = true;
    loadUsers();
  });

  $("user-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    show("user-form-error", "");
    const names = $("user-projects")
      .value.split(",")
      .map((s) => s.trim())
      .filter(Boolean);
    try {
      await api("POST", "/api/v1/users", {
        name: $("user-name").value.trim(),
        password: $("user-password").value,
        role: $("user-role").value,
        projects: names.length ? names : null,
      });
    } catch (error) {
      show("user-form-error", error.message);
      return;
    }
    $("user-form").reset();
    loadUsers();
  });

  // -- #/tokens ------------------------------------------------------------------

  async function loadTokens() {
    show("tokens-error", "");
    const all = $("tokens-all").checked;
    show(
      "tokens-note",
      me && me.kind === "legacy_token"
        ? "Signed in with a legacy admin token: tokens of your own belong to a user. Sign in with a name and password to make one."
        : "",
    );
    $("token-form").hidden = me != null && me.kind !== "user";
    let tokens;
    try {
      tokens = (await api("GET", `/api/v1/tokens${all ? "?all=true" : ""}`)).items;
    } catch (error) {
      show("tokens-error", error.message);
      return;
    }
    $("tokens-empty").hidden = tokens.length > 0;
    const body = $("tokens-table").tBodies[0];
    body.replaceChildren(
      ...tokens.map((token) => {
        const live = token.revoked_at == null;
        const revoke = live
          ? el("button", {
              class: "btn small",
              type: "button",
              text: "Revoke",
              onclick: () => revokeToken(token),
            })
          : null;
        return el(
          "tr",
          { "data-token": token.name },
          el("td", { text: token.name }),
          el("td", { text: token.kind === "legacy" ? "legacy admin token" : token.user ?? "–" }),
          el("td", { text: token.scope }),
          el("td", { class: "num", text: when(token.created_at) }),
          el("td", { class: "num", text: token.expires_at ? when(token.expires_at) : "never" }),
          el("td", { class: "num token-used", text: token.last_used_at ? when(token.last_used_at) : "never" }),
          el("td", { class: "token-state", text: live ? "live" : "revoked" }),
          el("td", { class: "task-actions" }, revoke),
        );
      }),
    );
  }

  async function revokeToken(token) {
    try {
      await api("DELETE", `/api/v1/tokens/${encodeURIComponent(token.id)}`);
    } catch (error) {
      show("tokens-error", error.message);
    }
    loadTokens();
  }

  $("tokens-all").addEventListener("change", loadTokens);

  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    show("token-form-error", "");
    const days = $("token-days").value;
    let made;
    try {
      made = await api("POST", "/api/v1/tokens", {
        name: $("token-name").value.trim(),
        scope: $("token-scope").value,
        expires_in_days: days ? Number(days) : null,
      });
    } catch (error) {
      show("token-form-error", error.message);
      return;
    }
    $("token-form").reset();
    $("token-secret").textContent = made.token; // shown once: not kept anywhere else
    $("token-secret-box").hidden = false;
    loadTokens();
  });

  $("sign-out-everywhere").addEventListener("click", async () => {
    try {
      await api("DELETE", "/api/v1/sessions");
    } catch {
      /* signed out either way */
    }
    location.replace("/login");
  });

  function showView(view) {
    current = view;
    $("token-secret-box").hidden = true;
    $("token-secret").textContent = "";
    if (view === "users") loadUsers();
    else loadTokens();
  }

  window.z4jAccounts = {
    show(view) {
      if (me == null) whoami().then(() => showView(view));
      else showView(view);
    },
  };

  whoami().then(() => {
    // app.js may have routed here before this script ran.
    const view = location.hash.replace(/^#\/?/, "").split(/[/?]/)[0];
    if ((view === "users" || view === "tokens") && current == null) showView(view);
  });
})();
