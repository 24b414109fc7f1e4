// z4j sign-in: POST a name and password, or a token (personal or legacy
// admin), to /api/v1/session, then go to the dashboard. A link may carry a
// token in the fragment (#token=...), which never reaches a server log; it is
// filled in, removed from the address bar and sent. With no user yet, the
// page says where the first-run setup link is.
"use strict";

(() => {
  const form = document.getElementById("login-form");
  const input = document.getElementById("token");
  const nameInput = document.getElementById("name");
  const passwordInput = document.getElementById("password");
  const error = document.getElementById("login-error");
  const submit = document.getElementById("login-submit");

  const theme = localStorage.getItem("z4j-theme");
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  async function signIn(credentials) {
    showError("");
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      const response = await fetch("/api/v1/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify(credentials),
      });
      if (response.ok) {
        location.replace("/");
        return;
      }
      let message = `The brain answered ${response.status}.`;
      try {
        const body = await response.json();
        if (response.status === 401) {
          message = credentials.token
            ? "This token was not accepted."
            : "Unknown name or wrong password.";
        }
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
    if (token) signIn({ token });
    else if (nameInput.value.trim() && passwordInput.value) {
      signIn({ name: nameInput.value.trim(), password: passwordInput.value });
    } else showError("Give your name and password, or a token.");
  });

  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromLink = fragment.get("token");
  if (fromLink) {
    history.replaceState(null, "", location.pathname + location.search);
    input.value = fromLink;
    signIn({ token: fromLink });
  }

  // A brain with no user yet: point at the one-time setup link.
  fetch("/api/v1/setup", { headers: { accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : null))
    .then((state) => {
      if (state && state.needed) {
        const hint = document.getElementById("setup-hint");
        if (hint) hint.hidden = false;
      }
    })
    .catch(() => {});
})();
