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

// plotly.min.js loads `async` (index.html): the page's first requests go out while the browser parses it, and
// drawing waits for this.
export const plotlyReady = new Promise((resolve, reject) => {
  if (window.Plotly) { resolve(); return; }
  const tag = document.getElementById("plotly-js");
  tag.addEventListener("load", () => resolve());
  tag.addEventListener("error", () => reject(new Error("the plotting library (/vendor/plotly.min.js) did not load")));
});

export function showError(error) {
  const bar = document.getElementById("error-bar");
  if (!error) { bar.hidden = true; return; }
  bar.textContent = error.message || String(error);
  bar.hidden = false;
}

// Background work (a refresh after a scrub, a push from the server) runs through `guarded`: its
// error is shown, and its success leaves the error bar alone, so a slow refresh can never hide the
// message of something the user just did. A user's action runs through `action`, which clears the
// bar first: the bar always shows the newest error since the user last did something.
// <body data-busy> counts the work in flight; tests and benchmarks wait for it to reach 0.
let busy = 0;

function setBusy(delta) {
  busy += delta;
  document.body.dataset.busy = String(busy);
}

export async function guarded(fn) {
  setBusy(1);
  try {
    return await fn();
  } catch (error) {
    showError(error);
    return undefined;
  } finally {
    setBusy(-1);
  }
}

// Count the page busy until the returned function is called (for work that starts after a delay).
export function hold() {
  setBusy(1);
  let held = true;
  return () => { if (held) { held = false; setBusy(-1); } };
}

export function action(fn) {
  showError(null);
  return guarded(fn);
}

// Latest wins: `const current = newest("model")` numbers a view update; after each await the update
// goes on only while `current()` is true, i.e. no newer update of the same view has started.
const generations = {};

export function newest(view) {
  const n = (generations[view] = (generations[view] || 0) + 1);
  return () => generations[view] === n;
}

export function generation(view) { return generations[view] || 0; }

export function enc(name) { return encodeURIComponent(name); }

// Data reaches the page only as text, never as markup: a run directory or a probe may be named
// `<img onerror=...>`. `fillOptions` sets a <select>'s options from [value, text] pairs (or strings).
export function fillOptions(select, items) {
  select.replaceChildren(...items.map((item) => {
    const [value, text] = Array.isArray(item) ? item : [item, item];
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    return option;
  }));
}

// Plotly renders a subset of HTML in titles, names, tick labels and hover text: escape data going
// into them so that a name shows as the characters it has.
export function plotText(text) {
  return String(text).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c]));
}
