// Forms marked data-api send their fields as JSON to the oracle's API with the
// session's CSRF token, then reload the page so it shows the server's state.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message;
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
  if (typeof fields.tags === "string") {
    fields.tags = fields.tags.split(/[\s,]+/).filter(Boolean);
  }
  const method = form.dataset.method || "POST";
  const hasBody = method !== "DELETE" && Object.keys(fields).length > 0;
  for (const button of form.querySelectorAll("button")) button.disabled = true;
  try {
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, ...(hasBody ? { "Content-Type": "application/json" } : {}) },
      body: hasBody ? JSON.stringify(fields) : undefined,
    });
    if (!response.ok) {
      const detail = await response.json().catch(() => ({ error: response.statusText }));
      flash(detail.error || `request failed (${response.status})`);
      return;
    }
    window.location.reload();
  } catch (error) {
    flash(`network error: ${error}`);
  } finally {
    for (const button of form.querySelectorAll("button")) button.disabled = false;
  }
}

for (const form of document.querySelectorAll("form[data-api]")) {
  form.addEventListener("submit", submitApi);
}
