// The dashboard page: state, wiring between views, and the WebSocket that pushes changes.
import { get, post, enc, guarded, action, hold, newest, generation, showError, fillOptions, plotlyReady } from "./api.js";
import { drawTimeline, drawHeatmap, moveStepLine } from "./timeline.js";
import { loadHeadScores, drawArchitecture, structureText, runText, drawHead, ablate, patch, gradients } from "./modelview.js";
import { loadNeurons } from "./neurons.js";
import { loadEssential, highlightEssential } from "./essential.js";
import { drawCircuits, renderCircuit, patchEdge } from "./circuits.js";

const state = {
  runs: [], run: null, compare: "", steps: [], step: null, useKernel: false,
  metric: null, heatmap: null, transitions: [], stages: [], text: "", selected: null, headRows: null,
};
window.phaselens = state;  // for the console, tests and benchmarks

const $ = (id) => document.getElementById(id);

async function loadRuns() {
  const { runs } = await get("/api/runs");
  state.runs = runs;
  const names = runs.map((r) => r.name);
  const keep = state.run;
  fillOptions($("run-select"), names);
  fillOptions($("compare-select"), [["", "(none)"], ...names]);
  $("compare-select").value = state.compare;
  if (keep && runs.some((r) => r.name === keep)) $("run-select").value = keep;
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of runs) {
    const row = document.createElement("tr");
    row.dataset.run = r.name;
    if (r.name === state.run) row.classList.add("selected");
    const config = Object.entries(r.config).map(([k, v]) => `${k.split(".")[1]}=${v}`).join(" ");
    const status = r.error ? `unreadable: ${r.error}` : r.status + (r.kernel_model ? " (+ notebook model)" : "");
    for (const text of [r.name, status, r.last_step ?? "–", r.checkpoints.length, config]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    row.addEventListener("click", () => action(() => selectRun(r.name)));
    body.appendChild(row);
  }
  $("live-status").textContent = runs.filter((r) => r.status === "running").length ? "a run is training: live" : "";
}

async function selectRun(name) {
  const current = newest("run");
  state.run = name;
  $("run-select").value = name;
  for (const row of $("runs-table").querySelectorAll("tbody tr")) row.classList.toggle("selected", row.dataset.run === name);
  const info = state.runs.find((r) => r.name === name);
  state.steps = info.checkpoints;
  state.useKernel = info.kernel_model;
  $("kernel-toggle").hidden = !info.kernel_model;
  $("use-kernel").checked = info.kernel_model;
  state.headRows = null;
  state.selected = null;
  $("patch-result").textContent = "–";  // results of the previous run's model
  if (window.Plotly) Plotly.purge("grad-plot");
  const slider = $("step-slider");
  slider.max = Math.max(0, state.steps.length - 1);
  slider.value = slider.max;
  state.step = state.steps.length ? state.steps[state.steps.length - 1] : null;
  updateStepLabel();
  const stepParam = state.useKernel || state.step === null ? "" : `?step=${state.step}`;
  // The default text needs the checkpoint loaded, the timeline does not: it is drawn meanwhile.
  const sampled = get(`/api/runs/${enc(name)}/sample${stepParam}`);
  sampled.catch(() => {});  // awaited below, where its error is shown
  await loadSeries();
  await plotlyReady;
  if (!current()) return;
  const timeline = guarded(refreshTimeline);
  const sample = await sampled;
  if (!current()) return;
  state.text = sample.text;
  state.sample = sample;
  $("text-input").value = sample.text;
  $("sample-note").textContent = sampleNote(sample);
  // The patch prompts follow the run: the server writes both in the model's own vocabulary.
  $("patch-clean").value = sample.text;
  $("patch-corrupted").value = sample.corrupted_text;
  await Promise.all([timeline, guarded(refreshModel), guarded(() => loadNeurons(state)), guarded(() => loadEssential(state))]);
}

// Where the default text comes from, and where an induction head can copy in it.
function sampleNote(sample) {
  const what = { "induction batch": "sequence 0 of the run's induction batch", "probe batch": "sequence 0 of the run's probe batch",
    drawn: "random tokens with a repeated segment" }[sample.origin];
  if (!sample.copy_positions) return `Default text: ${what}.`;
  const copies = sample.copy_positions.map((c, i) => (c ? i : -1)).filter((i) => i >= 0);
  if (!copies.length) return `Default text: ${what} (no copy positions).`;
  return `Default text: ${what}; predictions ${copies[0]}–${copies[copies.length - 1]} (${copies.length}) copy a repeated segment ` +
    "(dark bars in the loss plot: an induction head attends one token after the earlier copy there).";
}

async function loadSeries() {
  const [{ series }, { transitions }, { stages }] = await Promise.all([
    get(`/api/runs/${enc(state.run)}/series`), get(`/api/runs/${enc(state.run)}/transitions`), get(`/api/runs/${enc(state.run)}/stages`)]);
  state.transitions = transitions;
  state.stages = stages;
  const names = series.map((s) => `${s.probe}/${s.metric}`);
  const heat = series.filter((s) => s.per === "head").map((s) => `${s.probe}/${s.metric}`);
  fillOptions($("metric-select"), names);
  fillOptions($("heatmap-select"), heat);
  state.metric = names.includes(state.metric) ? state.metric : (names.includes("loss/copy") ? "loss/copy" : names[0] || null);
  state.heatmap = heat.includes(state.heatmap) ? state.heatmap : (heat.includes("attention/entropy") ? "attention/entropy" : heat[0] || null);
  $("metric-select").value = state.metric || "";
  $("heatmap-select").value = state.heatmap || "";
}

async function refreshTimeline() {
  if (!state.metric) { Plotly.purge("timeline-plot"); Plotly.purge("heatmap-plot"); return; }
  await Promise.all([drawTimeline(state), drawHeatmap(state)]);
}

// Redraw the model view for the current run and step. A newer refresh supersedes this one, and a
// loss view the user asked for after it began (an ablation, a re-run) is not overwritten by it.
async function refreshModel() {
  const current = newest("model");
  const lossAtStart = generation("loss");
  const arch = await post("/api/model/architecture", { run: state.run, step: state.useKernel ? null : state.step });
  if (!current()) return;
  $("model-source").textContent = `${structureText(arch)} ` +
    (arch.source === "kernel" ? "(the notebook's model)" : `(checkpoint at step ${state.step})`);
  $("text-label").textContent = `text: ${arch.text_hint}`;
  const scores = await loadHeadScores(state);
  if (!current()) return;
  drawArchitecture(state, arch, scores, (node) => action(() => selectNode(node, arch, scores)));
  await Promise.all([
    generation("loss") === lossAtStart ? guarded(() => runText(state)) : null,
    guarded(() => drawHead(state)),
    guarded(() => drawCircuits(state)),
  ]);
}

async function selectNode(node, arch, scores) {
  state.selected = node;
  drawArchitecture(state, arch, scores, (n) => action(() => selectNode(n, arch, scores)));
  await drawHead(state);
}

function updateStepLabel() {
  $("step-label").textContent = state.step === null ? "no checkpoints" : `step ${state.step}`;
}

// The model view follows the scrubber once it rests for 120 ms; the page counts as busy meanwhile.
let scrubTimer = null, releaseScrub = null;

function wire() {
  $("error-bar").addEventListener("click", () => showError(null));
  $("run-select").addEventListener("change", (e) => action(() => selectRun(e.target.value)));
  $("compare-select").addEventListener("change", (e) => { state.compare = e.target.value; action(refreshTimeline); });
  $("metric-select").addEventListener("change", (e) => { state.metric = e.target.value; action(() => drawTimeline(state)); });
  $("heatmap-select").addEventListener("change", (e) => { state.heatmap = e.target.value; action(() => drawHeatmap(state)); });
  $("step-slider").addEventListener("input", (e) => {
    state.step = state.steps[Number(e.target.value)] ?? null;
    updateStepLabel();
    moveStepLine(state);
    highlightEssential(state);
    clearTimeout(scrubTimer);
    if (state.useKernel) return;
    releaseScrub ||= hold();
    scrubTimer = setTimeout(() => {
      const release = releaseScrub;
      releaseScrub = null;
      action(refreshModel);
      release();
    }, 120);
  });
  $("use-kernel").addEventListener("change", (e) => { state.useKernel = e.target.checked; action(refreshModel); });
  $("text-input").addEventListener("change", (e) => { state.text = e.target.value; });
  $("run-text").addEventListener("click", () => { state.text = $("text-input").value; action(() => Promise.all([runText(state), drawHead(state)])); });
  $("ablate-btn").addEventListener("click", () => { state.text = $("text-input").value; action(() => ablate(state)); });
  $("patch-btn").addEventListener("click", () => action(() => patch(state)));
  state.onEdge = (edge) => action(() => patchEdge(state, edge));
  $("circuit-method").addEventListener("change", () => { if (state.circuit) renderCircuit(state); });
  $("grad-btn").addEventListener("click", () => { state.text = $("text-input").value; action(() => gradients(state)); });
}

function listen() {
  const url = new URL("/api/events", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  const socket = new WebSocket(url);
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "model_changed" && state.useKernel) guarded(refreshModel);
    if (message.type === "runs_changed") guarded(async () => {
      await loadRuns();
      const info = state.runs.find((r) => r.name === state.run);
      if (info && info.checkpoints.length !== state.steps.length) {
        const atEnd = Number($("step-slider").value) === state.steps.length - 1;
        state.steps = info.checkpoints;
        $("step-slider").max = Math.max(0, state.steps.length - 1);
        if (atEnd) { $("step-slider").value = $("step-slider").max; state.step = state.steps[state.steps.length - 1]; updateStepLabel(); }
      }
      await loadSeries();
      await refreshTimeline();
      state.circuitSteps = null;  // a probe sweep may have measured circuits at more steps
      await guarded(() => drawCircuits(state));
      await loadEssential(state);
    });
  };
  socket.onclose = () => setTimeout(listen, 2000);
  state.socket = socket;
}

async function start() {
  wire();
  await guarded(async () => {
    await loadRuns();
    const readable = state.runs.find((r) => !r.error);
    if (readable) await selectRun(readable.name);
    await plotlyReady;  // pushes redraw plots
  });
  listen();
  document.body.dataset.ready = "1";
}

start();
