// z4j first-run setup: the link the brain wrote at its first start
// (/setup#code=...) opens this page; POST /api/v1/setup creates the first
// admin with that code and signs them in. The code stays in the fragment
// (never sent in a URL, never in a server log) and leaves the address bar
// at once. Once any user exists the brain refuses it: the page says so.
"use strict";

(() => {
  const form = document.getElementById("setup-form");
  const nameInput = document.getElementById("setup-name");
  const password = document.getElementById("setup-password");
  const again = document.getElementById("setup-again");
  const error = document.getElementById("setup-error");
  const submit = document.getElementById("setup-submit");

  const theme = localStorage.getItem("z4j-theme");
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;

  const code = new URLSearchParams(location.hash.slice(1)).get("code") || "";
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  function done(text) {
    showError(text);
    submit.disabled = true;
    for (const input of [nameInput, password, again]) input.disabled = true;
  }

  if (!code) done("This page needs the setup link the brain wrote (it ends in #code=…).");
  fetch("/api/v1/setup", { headers: { accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : null))
    .then((state) => {
      if (state && !state.needed) done("This brain has users already: sign in instead.");
    })
    .catch(() => {});

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (password.value !== again.value) {
      showError("The passwords differ.");
      return;
    }
    showError("");
    submit.disabled = true;
    try {
      const response = await fetch("/api/v1/setup", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify({ code, name: nameInput.value.trim(), password: password.value }),
      });
      if (response.ok) {
        location.replace("/");
        return;
      }
      let message = `The brain answered ${response.status}.`;
      try {
        const body = await response.json();
        if (response.status === 409) message = "This brain has users already: sign in instead.";
        else if (response.status === 401) message = "This setup link is not this brain's.";
        else if (body && body.message) message = body.message;
      } catch {
        /* not JSON: keep the status line */
      }
      showError(message);
    } catch {
      showError("Cannot reach the brain. Is it running?");
    } finally {
      if (!error.textContent.startsWith("This brain has users")) submit.disabled = false;
    }
  });
})();
