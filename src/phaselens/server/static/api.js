// The JSON API (see phaselens/server/schemas.py): every call returns the parsed body or throws its error message.

export async function get(path) {
  return handle(await fetch(path, { credentials: "same-origin" }));
}

export async function post(path, body) {
  return handle(await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  }));
}

async function handle(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

export function showError(error) {
  const bar = document.getElementById("error-bar");
  if (!error) { bar.hidden = true; return; }
  bar.textContent = error.message || String(error);
  bar.hidden = false;
}

// Run `fn`, showing its error in the error bar instead of failing silently.
// A success clears the error bar only when it began after the call that raised the error shown:
// a slow request started earlier must not hide the message of a newer one.
let calls = 0, errorFrom = 0;

export async function guarded(fn) {
  const call = ++calls;
  try {
    const result = await fn();
    if (call > errorFrom) showError(null);
    return result;
  } catch (error) {
    errorFrom = call;
    showError(error);
    return undefined;
  }
}

export function enc(name) { return encodeURIComponent(name); }
