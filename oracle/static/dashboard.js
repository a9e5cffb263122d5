// Forms marked data-api send their fields as JSON to the oracle's API with the
// session's CSRF token, then reload the page so it shows the server's state, or go to
// data-then (after a delete), or show the answer's data-reveal field once (a new
// admin's password, a new API token) until the admin dismisses it.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.hidden = false;
}

function reveal(label, secret) {
  const box = document.getElementById("secret");
  box.replaceChildren();
  const text = document.createElement("p");
  text.textContent = `${label} (shown once, copy it now): `;
  const code = document.createElement("code");
  code.className = "secret-value";
  code.textContent = secret;
  text.append(code);
  const done = document.createElement("button");
  done.type = "button";
  done.textContent = "Done";
  done.addEventListener("click", () => window.location.reload());
  box.append(text, done);
  box.hidden = false;
}

async function submitApi(event) {
  event.preventDefault();
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
  const fields = Object.fromEntries(new FormData(form).entries());
  // "{key}" in the URL is taken from the form field of that name (e.g. the member to add).
  const url = form.dataset.api.replace(/\{(\w+)\}/g, (_, name) => {
    const value = fields[name] || "";
    delete fields[name];
    return encodeURIComponent(value);
  });
  // Number fields go as numbers (times data-scale: minutes typed, seconds sent); empty is null.
  for (const input of form.querySelectorAll('input[type="number"]')) {
    const text = fields[input.name];
    fields[input.name] = text ? Number(text) * Number(input.dataset.scale || 1) : null;
  }
  if (typeof fields.tags === "string") {
    fields.tags = fields.tags.split(/[\s,]+/).filter(Boolean);
  }
  const method = form.dataset.method || "POST";
  // data-raw names a field sent as the whole body, as typed (a configuration document).
  const raw = form.dataset.raw ? fields[form.dataset.raw] : undefined;
  const hasBody = raw !== undefined || (method !== "DELETE" && Object.keys(fields).length > 0);
  for (const button of form.querySelectorAll("button")) button.disabled = true;
  try {
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, ...(hasBody ? { "Content-Type": "application/json" } : {}) },
      body: raw !== undefined ? raw : hasBody ? JSON.stringify(fields) : undefined,
    });
    if (!response.ok) {
      const detail = await response.json().catch(() => ({ error: response.statusText }));
      flash(detail.error || `request failed (${response.status})`);
      return;
    }
    if (form.dataset.reveal) {
      const answer = await response.json();
      const name = answer.username || answer.name;
      reveal(`${form.dataset.reveal === "password" ? "Password" : "Token"} for ${name}`,
             answer[form.dataset.reveal]);
      form.reset();
    } else if (form.dataset.then) {
      window.location.assign(form.dataset.then);
    } else {
      window.location.reload();
    }
  } catch (error) {
    flash(`network error: ${error}`);
  } finally {
    for (const button of form.querySelectorAll("button")) button.disabled = false;
  }
}

for (const form of document.querySelectorAll("form[data-api]")) {
  form.addEventListener("submit", submitApi);
}
