// Timeline: metric curves with transition markers and windows, layer x head heatmaps, a scrubber line.
import { get, enc, newest, plotText } from "./api.js";

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

function label(layer, head) {
  if (layer === null) return "model";
  return head === null ? `L${layer}` : `L${layer}H${head}`;
}

// The API's choice of source for every curve (`Run.metrics(prefer=...)`); the page never decides it.
export const PREFER = "densest";

// Rows of one metric, grouped into series (one per layer/head). The rows hold one source per series
// when asked with `prefer=`; the source is kept on each series for its hover text.
export function toSeries(rows) {
  const series = new Map();
  for (let i = 0; i < rows.step.length; i++) {
    const key = label(rows.layer[i], rows.head[i]);
    if (!series.has(key)) series.set(key, { name: key, layer: rows.layer[i], head: rows.head[i], source: rows.source[i], x: [], y: [] });
    const s = series.get(key);
    s.x.push(rows.step[i]);
    s.y.push(rows.value[i]);
  }
  return [...series.values()];
}

// "probe/metric" as the selects show it; a probe's own name may hold a "/".
function probeAndMetric(name) {
  const cut = name.lastIndexOf("/");
  return [name.slice(0, cut), name.slice(cut + 1)];
}

export async function loadMetric(run, probe, metric) {
  return toSeries(await get(`/api/runs/${enc(run)}/metrics?probe=${enc(probe)}&metric=${enc(metric)}&prefer=${PREFER}`));
}

// The y-axis title (with its unit) of a metric: one table for every plot of the page, first match wins.
const METRIC_AXES = [
  [(p, m) => p === "loss", () => "cross-entropy (nats)"],
  [(p, m) => /entropy/.test(m), () => "entropy (nats)"],
  [(p, m) => /(^|_)kl($|_)/.test(m), () => "KL divergence (nats)"],
  [(p, m) => /accuracy|(^|_)acc($|_)/.test(m), () => "accuracy (fraction)"],
  [(p, m) => p === "heads", (p, m) => `${m} score (attention on the pattern, 0–1)`],
  [(p, m) => p === "llc", () => "local learning coefficient λ̂"],
  [(p, m) => /norm/.test(m), (p, m) => `${m} (L2)`],
];

export function metricAxis(probe, metric) {
  const found = METRIC_AXES.find(([match]) => match(probe, metric));
  return found ? found[1](probe, metric) : metric;
}

// Developmental stages (cut at the critical points of the LLC curve): grey bands behind every curve, labelled at
// the top. Detected transitions: an orange outlined window with a dashed line at the step. The two never share a look,
// and the legend names both.
const STAGE_COLORS = ["#ececec", "#dcdcdc"];
export const TRANSITION_COLOR = "#e07000";

function stageBands(stages) {
  return stages.map((st, i) => ({ type: "rect", xref: "x", yref: "paper", x0: st.start, x1: st.end, y0: 0, y1: 1, layer: "below",
    fillcolor: STAGE_COLORS[i % 2], opacity: 0.8, line: { width: 0 }, name: `stage ${st.index}` }));
}

function transitionShapes(t) {
  return [
    { type: "rect", xref: "x", yref: "paper", x0: t.start, x1: t.end, y0: 0, y1: 1, fillcolor: TRANSITION_COLOR, opacity: 0.18,
      line: { color: TRANSITION_COLOR, width: 1.5 }, name: "transition window" },
    { type: "line", xref: "x", yref: "paper", x0: t.step, x1: t.step, y0: 0, y1: 1, line: { color: TRANSITION_COLOR, dash: "dash", width: 1.5 },
      name: "transition" },
  ];
}

// Legend entries for what shapes draw (Plotly lists traces only): empty traces styled as the shapes are.
function shapeLegend(hasStages, hasTransitions) {
  const entry = (name, color, line) => ({ type: "scatter", mode: "markers", x: [null], y: [null], name, hoverinfo: "skip",
    marker: { symbol: "square", size: 12, color, line: { color: line, width: 2 } } });
  return [
    ...(hasStages ? [entry("LLC stage (grey band)", STAGE_COLORS[1], STAGE_COLORS[1])] : []),
    ...(hasTransitions ? [entry("detected transition (window, step dashed)", "rgba(224, 112, 0, 0.25)", TRANSITION_COLOR)] : []),
  ];
}

function stageLabels(stages) {
  return stages.map((st) => ({ x: (st.start + st.end) / 2, y: 1, xref: "x", yref: "paper", yanchor: "bottom", showarrow: false,
    text: `stage ${st.index}`, font: { size: 10, color: "#555" },
    hovertext: `steps ${st.start}–${st.end}: LLC ${st.llc_start.toFixed(1)} → ${st.llc_end.toFixed(1)}<br>${st.transitions.map(plotText).join("<br>")}` }));
}

function stepLine(step) {
  return { type: "line", xref: "x", yref: "paper", x0: step, x1: step, y0: 0, y1: 1, line: { color: "#d33", width: 2 }, name: "step" };
}

export async function drawTimeline(state) {
  const current = newest("timeline");
  const [probe, metric] = probeAndMetric(state.metric);
  const own = await loadMetric(state.run, probe, metric);
  const traces = own.map((s, i) => ({ ...s, type: "scatter", mode: "lines", line: { color: COLORS[i % COLORS.length], width: 1.5 } }));
  if (state.compare) {
    const other = await loadMetric(state.compare, probe, metric).catch(() => []);
    other.forEach((s, i) => traces.push({ ...s, name: `${plotText(state.compare)}: ${s.name}`, type: "scatter", mode: "lines",
      line: { color: COLORS[i % COLORS.length], width: 1.5, dash: "dot" } }));
  }
  if (!current()) return;
  const marks = state.transitions.filter((t) => t.probe === probe && t.metric === metric);
  const shapes = [...stageBands(state.stages || []), ...marks.flatMap(transitionShapes)];
  traces.push(...shapeLegend((state.stages || []).length > 0, marks.length > 0));
  state.timelineShapes = shapes;
  const layout = { title: { text: plotText(`${probe} / ${metric}`), font: { size: 13 } }, margin: { t: 30, r: 10, b: 35, l: 60 },
    xaxis: { title: { text: "step" } }, yaxis: { title: { text: plotText(metricAxis(probe, metric)), font: { size: 11 } } },
    shapes: [...shapes, stepLine(state.step ?? 0)], legend: { font: { size: 10 } },
    annotations: stageLabels(state.stages || []) };
  await Plotly.react("timeline-plot", traces, layout, { displaylogo: false, responsive: true });
}

export async function drawHeatmap(state) {
  if (!state.heatmap) { Plotly.purge("heatmap-plot"); return; }
  const current = newest("heatmap");
  const [probe, metric] = probeAndMetric(state.heatmap);
  const series = (await loadMetric(state.run, probe, metric)).filter((s) => s.head !== null);
  if (!current()) return;
  const steps = [...new Set(series.flatMap((s) => s.x))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const z = series.map((s) => { const row = new Array(steps.length).fill(null); s.x.forEach((x, i) => { row[index.get(x)] = s.y[i]; }); return row; });
  const trace = { type: "heatmap", x: steps, y: series.map((s) => s.name), z, colorscale: "Viridis", hovertemplate: "%{y} step %{x}: %{z:.3f}<extra></extra>",
    colorbar: { title: { text: plotText(metricAxis(probe, metric)), side: "right", font: { size: 10 } } } };
  const layout = { title: { text: plotText(`${probe} / ${metric} (layer x head over steps)`), font: { size: 13 } }, margin: { t: 30, r: 10, b: 35, l: 70 },
    xaxis: { title: { text: "step" } }, yaxis: { title: { text: "head (layer L, head H)", font: { size: 11 } } }, shapes: [stepLine(state.step ?? 0)] };
  await Plotly.react("heatmap-plot", [trace], layout, { displaylogo: false, responsive: true });
}

// Move the scrubber line on both plots without redrawing their data.
export function moveStepLine(state) {
  const step = state.step ?? 0;
  for (const [id, base] of [["timeline-plot", state.timelineShapes || []], ["heatmap-plot", []]]) {
    const el = document.getElementById(id);
    if (el && el.data) Plotly.relayout(el, { shapes: [...base, stepLine(step)] });
  }
}
