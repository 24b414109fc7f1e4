// z4j sign-in: POST the admin token to /api/v1/session, then go to the dashboard.
// A setup link may carry the token in the fragment (#token=...), which never
// reaches a server log; it is filled in, removed from the address bar and sent.
"use strict";

(() => {
  const form = document.getElementById("login-form");
  const input = document.getElementById("token");
  const error = document.getElementById("login-error");
  const submit = document.getElementById("login-submit");

  const theme = localStorage.getItem("z4j-theme");
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  async function signIn(token) {
    showError("");
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      const response = await fetch("/api/v1/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify({ token }),
      });
      if (response.ok) {
        location.replace("/");
        return;
      }
      let message = `The brain answered ${response.status}.`;
      try {
        const body = await response.json();
        if (response.status === 401) message = "This token was not accepted.";
        else if (response.status === 429) {
          const wait = response.headers.get("retry-after");
          message = `Too many failed sign-ins: try again ${wait ? `in ${wait} s` : "later"}.`;
        }
        else if (body && body.message) message = body.message;
      } catch {
        /* not JSON: keep the status line */
      }
      showError(message);
    } catch {
      showError("Cannot reach the brain. Is it running?");
    } finally {
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (token) signIn(token);
  });

  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromLink = fragment.get("token");
  if (fromLink) {
    history.replaceState(null, "", location.pathname + location.search);
    input.value = fromLink;
    signIn(fromLink);
  }
})();
