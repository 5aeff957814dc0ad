// Essential dynamics: the PCA trajectory of the outputs across checkpoints (PC1–PC2, coloured by step) and its
// turning strength against the random-walk null; the scrubbed checkpoint is ringed. Shown only for runs the
// `essential_dynamics` probe measured (GET /api/runs/RUN/essential). Text reaches the page as text only.
import { get, enc, newest, plotText } from "./api.js";

const TRANSITION = "#b03030", STAGE = "#2060c0", TURN = "#e08000";
const CONFIG = { displaylogo: false, responsive: true };

export async function loadEssential(state) {
  const current = newest("essential");
  const section = document.getElementById("essential-view");
  const data = await get(`/api/runs/${enc(state.run)}/essential`).catch(() => ({ available: false }));
  if (!current()) return;
  state.essential = data.available ? data : null;
  section.hidden = !data.available;
  if (!data.available) { Plotly.purge("essential-plot"); Plotly.purge("essential-turning-plot"); return; }
  document.getElementById("essential-summary").textContent = summary(data);
  const marks = markedSteps(state);
  const near = (steps) => [...new Set(steps.map((s) => nearestIndex(data.steps, s)))];
  const at = (idx, key) => idx.map((i) => data[key][i]);
  const ringed = near(marks.transitions), boxed = near(marks.boundaries);
  const starred = data.turning_points.map((s) => data.steps.indexOf(s));
  const hover = data.steps.map((s, i) => `step ${s}<br>turning ${data.turning[i] === null ? "–" : data.turning[i].toFixed(1) + "°"}`);
  const traces = [
    { type: "scatter", mode: "lines+markers", x: data.pc1, y: data.pc2, text: hover, hoverinfo: "text", name: "trajectory",
      line: { color: "#aaa", width: 1 }, marker: { color: data.steps, colorscale: "Viridis", size: 7, colorbar: { title: { text: "step" } } } },
    { type: "scatter", mode: "markers", x: at(ringed, "pc1"), y: at(ringed, "pc2"), name: "copy-loss transition", hoverinfo: "skip",
      marker: { symbol: "circle-open", size: 15, color: TRANSITION, line: { width: 2 } } },
    { type: "scatter", mode: "markers", x: at(boxed, "pc1"), y: at(boxed, "pc2"), name: "LLC stage boundary", hoverinfo: "skip",
      marker: { symbol: "square-open", size: 13, color: STAGE, line: { width: 2 } } },
    { type: "scatter", mode: "markers", x: at(starred, "pc1"), y: at(starred, "pc2"), name: "turning point beyond the null", hoverinfo: "skip",
      marker: { symbol: "star", size: 16, color: TURN, line: { width: 1, color: "#000" } } },
    { type: "scatter", mode: "markers", x: [], y: [], name: "this checkpoint", hoverinfo: "skip",
      marker: { symbol: "circle-open", size: 22, color: "#d33", line: { width: 3 } } },
  ];
  const percent = (k) => data.explained[k] === undefined ? "" : ` (${(100 * data.explained[k]).toFixed(0)}%)`;
  await Plotly.react("essential-plot", traces, {
    title: { text: plotText("PCA of the outputs across checkpoints"), font: { size: 12 } }, showlegend: true,
    legend: { font: { size: 10 }, orientation: "h", x: 0, y: -0.3 }, margin: { t: 30, r: 10, b: 60, l: 50 },
    xaxis: { title: { text: "PC1" + percent(0) } }, yaxis: { title: { text: "PC2" + percent(1) } } }, CONFIG);
  const lines = [...marks.transitions.map((s) => vline(s, TRANSITION, "dash")), ...marks.boundaries.map((s) => vline(s, STAGE, "dashdot"))];
  state.essentialShapes = lines;
  await Plotly.react("essential-turning-plot", [
    { type: "scatter", mode: "lines+markers", x: data.steps, y: data.turning, name: "turning (degrees)", line: { color: "#333" } },
    { type: "scatter", mode: "lines", x: data.steps, y: data.threshold, name: "random-walk null", line: { color: "#888", dash: "dot" } },
    { type: "scatter", mode: "markers", x: data.turning_points, y: data.turning_points.map((s) => data.turning[data.steps.indexOf(s)]),
      name: "beyond the null", marker: { symbol: "star", size: 14, color: TURN } },
  ], { title: { text: plotText("turning strength against the null"), font: { size: 12 } }, shapes: lines,
    margin: { t: 30, r: 10, b: 60, l: 50 }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "degrees" }, range: [0, 185] },
    legend: { font: { size: 10 }, orientation: "h", x: 0, y: -0.3 } }, CONFIG);
  highlightEssential(state);
}

// Ring the scrubbed checkpoint on the trajectory and draw its line on the turning plot.
export function highlightEssential(state) {
  const data = state.essential;
  const plot = document.getElementById("essential-plot");
  if (!data || !plot || !plot.data || state.step === null) return;
  const i = nearestIndex(data.steps, state.step);
  Plotly.restyle(plot, { x: [[data.pc1[i]]], y: [[data.pc2[i]]] }, [4]);
  const turning = document.getElementById("essential-turning-plot");
  if (turning && turning.data) Plotly.relayout(turning, { shapes: [...(state.essentialShapes || []), vline(data.steps[i], "#d33", "solid")] });
}

function summary(data) {
  const parts = data.explained.slice(0, 3).map((v, k) =>
    `PC${k + 1} ${(100 * v).toFixed(1)}% (random walk ${(100 * data.null_explained[k]).toFixed(1)}%, with these step lengths ${(100 * data.matched_null_explained[k]).toFixed(1)}%)`);
  const n = data.turning_points.length;
  const turns = n ? `turning point${n > 1 ? "s" : ""} beyond the null at step${n > 1 ? "s" : ""} ${data.turning_points.join(", ")}`
    : "no turning point beyond the random-walk null";
  return `Explained variance: ${parts.join("; ")}. ${turns[0].toUpperCase() + turns.slice(1)}.` +
    (data.stored ? "" : " (Computed from the stored vectors: phaselens probe RUN --probes essential_dynamics stores it.)");
}

// The copy-loss transitions (every loss transition when there is no copy loss) and the LLC stage boundaries.
function markedSteps(state) {
  const losses = (state.transitions || []).filter((t) => t.probe === "loss");
  const copy = losses.filter((t) => t.metric === "copy");
  return { transitions: (copy.length ? copy : losses).map((t) => t.step), boundaries: (state.stages || []).slice(1).map((st) => st.start) };
}

function nearestIndex(steps, step) {
  let best = 0;
  for (let i = 1; i < steps.length; i++) if (Math.abs(steps[i] - step) < Math.abs(steps[best] - step)) best = i;
  return best;
}

function vline(x, color, dash) {
  return { type: "line", xref: "x", yref: "paper", x0: x, x1: x, y0: 0, y1: 1, line: { color, width: 1.5, dash } };
}
