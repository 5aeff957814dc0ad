// Circuit view: the circuits probe's graph at the scrubbed checkpoint (server/circuits.py), nodes in layer
// columns, edges drawn by score, the circuit's edges highlighted; clicking an edge patches it live.
// Every name is set as text (textContent, attributes), never as markup.
import { get, post, enc, newest, fillOptions } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";
const COLUMN_W = 130, ROW_H = 46, NODE_W = 64, NODE_H = 30, TOP = 30;
const PORTS = { q: -9, k: 0, v: 9 };  // where a head's q, k and v inputs enter it (y offset)
const $ = (id) => document.getElementById(id);

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function signed(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  return (value >= 0 ? "+" : "") + value.toPrecision(digits);
}

// The measured step the view shows for scrubbed step `step`: the latest at or before it (else the first).
export function shownStep(steps, step) {
  if (!steps.length) return null;
  if (step === null) return steps[steps.length - 1];
  const before = steps.filter((s) => s <= step);
  return before.length ? before[before.length - 1] : steps[0];
}

export async function drawCircuits(state) {
  const current = newest("circuits");
  if (!state.run) return;
  if (!state.circuitSteps || state.circuitSteps.run !== state.run) {
    const run = state.run;
    const { steps } = await get(`/api/runs/${enc(run)}/circuits`);
    if (run !== state.run) return;
    state.circuitSteps = { run, steps };
  }
  const step = shownStep(state.circuitSteps.steps, state.useKernel ? null : state.step);
  $("circuits-view").hidden = step === null;
  if (step === null) { state.circuit = null; return; }
  if (!state.circuit || state.circuit.run !== state.run || state.circuit.step !== step) {
    const graph = await get(`/api/runs/${enc(state.run)}/circuits/${step}`);
    if (!current()) return;
    state.circuit = graph;
    const methods = $("circuit-method");
    const keep = methods.value;
    fillOptions(methods, graph.methods);
    methods.value = graph.methods.includes(keep) ? keep : graph.circuit_method;
  }
  if (!current()) return;
  renderCircuit(state);
}

export function renderCircuit(state) {
  const graph = state.circuit;
  const method = $("circuit-method").value || graph.circuit_method;
  const svg = $("circuit-graph");
  svg.replaceChildren();
  svg.dataset.step = String(graph.step);
  const members = graph.edges.filter((e) => e.in_circuit);
  $("circuit-summary").textContent = summary(graph, state, members.length);

  // nodes: one column each for embed, every layer's heads, every layer's MLP, and logits
  const columns = {};
  for (const node of graph.nodes) (columns[node.column] ||= []).push(node);
  const tallest = Math.max(...Object.values(columns).map((c) => c.length));
  const height = TOP * 2 + tallest * ROW_H;
  const width = (Math.max(...graph.nodes.map((n) => n.column)) + 1) * COLUMN_W;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const where = {};
  for (const [column, nodes] of Object.entries(columns)) {
    nodes.forEach((node, i) => {
      const y = TOP + (tallest - nodes.length) * ROW_H / 2 + i * ROW_H + ROW_H / 2;
      where[node.name] = { x: Number(column) * COLUMN_W + (COLUMN_W - NODE_W) / 2, y, node };
    });
  }
  const inCircuit = new Set(members.flatMap((e) => [e.upstream, e.downstream]));

  // edges, the weakest first so the strongest lie on top
  const score = (e) => e.scores[method] ?? 0;
  const top = Math.max(1e-12, ...graph.edges.map((e) => Math.abs(score(e))));
  const layer = el("g", { class: "edges" }, svg);
  for (const e of [...graph.edges].sort((a, b) => Math.abs(score(a)) - Math.abs(score(b)))) {
    const from = where[e.upstream], to = where[e.downstream];
    const x1 = from.x + NODE_W, y1 = from.y, x2 = to.x, y2 = to.y + (PORTS[e.input] ?? 0);
    const mid = (x1 + x2) / 2;
    const d = `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`;
    const group = el("g", { class: "edge" + (e.in_circuit ? " member" : ""), "data-edge": e.edge, "data-score": String(score(e)) }, layer);
    el("title", {}, group).textContent = `${e.edge}: ` + graph.methods.map((m) => `${m} ${signed(e.scores[m])}`).join(", ") +
      (e.in_circuit ? " (in the circuit)" : "") + " — click to patch it";
    el("path", { d, class: "line", stroke: score(e) >= 0 ? "#1f6fb4" : "#c0392b", "stroke-width": (0.6 + 7 * Math.abs(score(e)) / top).toFixed(2),
                 fill: "none", opacity: e.in_circuit ? 0.95 : 0.22 }, group);
    el("path", { d, class: "hit", stroke: "transparent", "stroke-width": 9, fill: "none" }, group);
    group.addEventListener("click", () => state.onEdge && state.onEdge(e.edge));
  }
  if (state.patched && state.patched.step === graph.step) markSelected(state.patched.edge);

  for (const { x, y, node } of Object.values(where)) {
    const group = el("g", { class: "cnode" + (inCircuit.has(node.name) ? " member" : ""), "data-node": node.name }, svg);
    el("rect", { x, y: y - NODE_H / 2, width: NODE_W, height: NODE_H, rx: 5 }, group);
    el("text", { x: x + NODE_W / 2, y: y + 4, "text-anchor": "middle" }, group).textContent = node.name;
    if (node.kind === "head") {
      for (const [port, dy] of Object.entries(PORTS)) el("text", { x: x + 3, y: y + dy + 3, class: "port" }, group).textContent = port;
    }
  }
}

function summary(graph, state, size) {
  const scrubbed = state.step !== null && state.step !== graph.step ? ` (the latest measured at or before step ${state.step})` : "";
  const pairs = graph.pairs;
  const what = `pairs: ${pairs.patch} tokens corrupted (${pairs.corrupt || "fresh"}), metric = loss at ${pairs.read}, ${pairs.sequences} sequences`;
  const metric = `metric clean ${graph.metric_clean?.toFixed(4) ?? "–"}, corrupt ${graph.metric_corrupt?.toFixed(4) ?? "–"}`;
  const circuit = graph.faithfulness === null
    ? "no clear clean/corrupt effect at this step, so no circuit"
    : `circuit: ${size} edges, faithfulness ${graph.faithfulness.toFixed(3)} (≥ ${graph.threshold}, found with ${graph.circuit_method})`;
  return `step ${graph.step}${scrubbed}; ${circuit}; ${metric}; ${what}.`;
}

function markSelected(edge) {
  for (const node of $("circuit-graph").querySelectorAll(".edge")) node.classList.toggle("selected", node.dataset.edge === edge);
}

// Patch one edge clean -> corrupt on the loaded checkpoint and show the metric change beside the stored scores.
export async function patchEdge(state, edge) {
  const graph = state.circuit;
  const out = $("circuit-patch-result");
  out.textContent = `patching ${edge} at step ${graph.step} …`;
  const r = await post("/api/circuits/patch", { run: state.run, step: graph.step, edge });
  if (state.circuit !== graph) return;
  state.patched = r;
  markSelected(edge);
  const stored = Object.entries(r.stored).map(([m, v]) => `${m} ${signed(v)}`).join(", ") || "none at this step";
  out.textContent = `${r.edge} patched clean → corrupt at step ${r.step} (${r.sequences} sequences): loss at ${r.read} ` +
    `${r.metric_clean.toFixed(4)} → ${r.metric_patched.toFixed(4)}, change ${signed(r.change)}; stored scores: ${stored}` +
    (r.in_circuit === null ? "" : r.in_circuit ? " (in the circuit)" : " (not in the circuit)");
  out.dataset.edge = r.edge;
  out.dataset.change = String(r.change);
  out.dataset.stored = r.stored.exact === undefined || r.stored.exact === null ? "" : String(r.stored.exact);
  out.dataset.seq = String(Number(out.dataset.seq || 0) + 1);
}
