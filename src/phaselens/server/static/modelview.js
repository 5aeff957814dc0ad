// Model view at the scrubbed checkpoint: architecture map, per-token loss, a head's attention,
// scores and circuits, ablate / freeze, patching and gradient attribution.
import { post, get, enc, guarded, newest, plotText } from "./api.js";
import { PREFER, toSeries } from "./timeline.js";

const SVG = "http://www.w3.org/2000/svg";
const PLOT = { displaylogo: false, responsive: true };

function modelRef(state) {
  return { run: state.run, step: state.useKernel ? null : state.step };
}

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Head scores of the run at the latest recorded step <= `step`: {"L1H0": {induction: .7, ...}}.
export async function loadHeadScores(state) {
  if (!state.headRows || state.headRows.run !== state.run) {
    const run = state.run;
    const rows = await get(`/api/runs/${enc(run)}/metrics?probe=heads&prefer=${PREFER}`).catch(() => null);
    if (run === state.run) state.headRows = rows && { ...rows, run };
  }
  const rows = state.headRows;
  const scores = {};
  if (!rows || state.step === null) return scores;
  const best = {};
  for (let i = 0; i < rows.step.length; i++) {
    if (rows.head[i] === null || rows.step[i] > state.step) continue;
    const key = `L${rows.layer[i]}H${rows.head[i]}/${rows.metric[i]}`;
    if (!(key in best) || rows.step[i] > best[key].step || (rows.step[i] === best[key].step && rows.source[i] === "checkpoint")) {
      best[key] = { step: rows.step[i], value: rows.value[i] };
    }
  }
  for (const [key, v] of Object.entries(best)) {
    const [node, metric] = key.split("/");
    (scores[node] ||= {})[metric] = v.value;
  }
  return scores;
}

// The map's geometry from the model's size alone: a few heads get wide boxes with "H3" and a
// "layer 3" caption; Pythia-410m's 24 layers x 16 heads get a compact grid (numbers in the boxes,
// "L3" at the left) that still leaves every box a comfortable click target.
export function mapLayout(arch) {
  const heads = drawnHeads(arch);
  const nodes = heads + (arch.has_mlp ? 1 : 0);
  const compact = arch.n_layers > 8 || heads > 4;
  const rowH = compact ? Math.max(24, Math.min(40, Math.floor(640 / arch.n_layers))) : 64;
  const nodeH = compact ? rowH - 6 : 26;
  const headW = compact ? Math.max(22, Math.min(34, Math.floor(480 / nodes) - 3)) : 44;
  const gap = compact ? 3 : 6;
  const mlpW = Math.max(headW, 32);
  const spine = compact ? 30 : 24;
  const left = spine + (compact ? 10 : 20);
  const width = Math.max(260, left + heads * (headW + gap) + (arch.has_mlp ? mlpW + gap : 0) + 8);
  return { compact, rowH, nodeH, headW, mlpW, gap, spine, left, width, top: 40, bottom: 60 };
}

// Heads the map draws: softmax heads (clickable), or heads without a pattern (BDH's linear attention, shown only).
function drawnHeads(arch) { return arch.n_heads || arch.n_linear_heads || 0; }

// The model's structure in words, as the adapter reports it.
export function structureText(arch) {
  const layers = arch.shared_weights ? `${arch.n_layers} passes of one shared block` : `${arch.n_layers} layers`;
  const heads = arch.n_heads ? ` × ${arch.n_heads} heads`
    : arch.n_linear_heads ? ` × ${arch.n_linear_heads} linear-attention heads` : ", no attention heads";
  const neurons = arch.n_neurons ? ` of ${arch.n_neurons} sparse neurons (${arch.n_neurons * drawnHeads(arch)} neurons per layer)` : "";
  return `${arch.architecture}, ${layers}${heads}${neurons}${arch.has_mlp ? ", MLPs" : ""}, vocabulary ${arch.d_vocab}`;
}

export function drawArchitecture(state, arch, scores, onSelect) {
  const svg = document.getElementById("arch");
  svg.replaceChildren();
  svg.dataset.step = state.useKernel ? "kernel" : String(state.step);  // which model the map shows
  const L = mapLayout(arch);
  document.getElementById("select-hint").textContent = arch.n_heads || arch.has_mlp ? "Click a head (or an MLP) to inspect it."
    : "These heads have no softmax pattern to inspect: their sparse neurons are in the Neurons view.";
  const height = L.top + arch.n_layers * L.rowH + L.bottom;
  svg.setAttribute("height", height);
  svg.setAttribute("width", L.width);
  el("line", { x1: L.spine, y1: 18, x2: L.spine, y2: height - 18, stroke: "#889", "stroke-width": 4 }, svg);
  const box = (y, text) => {
    el("rect", { x: 4, y: y - 11, width: 120, height: 22, fill: "#dde6f0", rx: 4 }, svg);
    el("text", { x: 10, y: y + 4 }, svg).textContent = text;
  };
  box(height - 22, "embed");
  box(22, "unembed");
  for (let layer = 0; layer < arch.n_layers; layer++) {
    const y = height - L.bottom - layer * L.rowH - L.rowH / 2;
    if (L.compact) el("text", { x: 2, y: y + 4, fill: "#555", class: "layer-label" }, svg).textContent = `L${layer}`;
    else el("text", { x: L.spine + 6, y: y - 20, fill: "#555", class: "layer-label" }, svg).textContent = `layer ${layer}`;
    const nodes = [];
    for (let head = 0; head < drawnHeads(arch); head++) nodes.push({ layer, head, label: L.compact ? String(head) : `H${head}`, w: L.headW });
    if (arch.has_mlp) nodes.push({ layer, head: null, label: "MLP", w: L.mlpW });
    const xs = [];
    nodes.reduce((x, n) => { xs.push(x); return x + n.w + L.gap; }, L.left);
    // One connector from the backbone to the last node, drawn under the nodes and never clickable:
    // a node's own line would pass over its left neighbours and take their clicks.
    if (nodes.length) el("line", { x1: L.spine, y1: y, x2: xs[xs.length - 1], y2: y, stroke: "#bbb", "pointer-events": "none" }, svg);
    nodes.forEach((n, i) => {
      const x = xs[i];
      const name = n.head === null ? `L${layer}MLP` : `L${layer}H${n.head}`;
      const s = scores[name] || {};
      const ind = s.induction ?? 0;
      if (n.head !== null && !arch.n_heads) {  // a head without a softmax pattern: its neurons, nothing to click
        const g = el("g", { class: "node linear", "data-node": name, "data-layer": layer, "data-head": n.head }, svg);
        el("rect", { x, y: y - L.nodeH / 2, width: n.w, height: L.nodeH, rx: 3, fill: "#e4ecf7" }, g);
        el("text", { x: x + n.w / 2, y: y + 4, "text-anchor": "middle" }, g).textContent = n.label;
        el("title", {}, g).textContent = `${name}: ${arch.n_neurons} sparse neurons, linear attention (no softmax pattern to show; ` +
          "see the Neurons view)";
        return;
      }
      const g = el("g", { class: "node", "data-node": name, "data-layer": layer, "data-head": n.head ?? "",
        "data-induction": s.induction ?? "", "data-prev-token": s.prev_token ?? "" }, svg);
      const fill = n.head === null ? "#f4e2c7" : `rgba(214, 60, 50, ${0.1 + 0.85 * Math.max(0, Math.min(1, ind))})`;
      el("rect", { x, y: y - L.nodeH / 2, width: n.w, height: L.nodeH, rx: 3, fill }, g);
      el("text", { x: x + n.w / 2, y: y + 4, "text-anchor": "middle" }, g).textContent = n.label;
      const title = el("title", {}, g);
      title.textContent = n.head === null ? `layer ${layer} MLP` :
        `L${layer}H${n.head}: induction ${fmt(s.induction)}, previous-token ${fmt(s.prev_token)}, duplicate ${fmt(s.duplicate)}`;
      if (state.selected && state.selected.layer === layer && state.selected.head === n.head) g.classList.add("selected");
      g.addEventListener("click", () => onSelect({ layer, head: n.head }));
    });
  }
}

function fmt(v) { return v === undefined || v === null ? "–" : Number(v).toFixed(2); }

function positionLabels(labels) { return labels.slice(0, -1).map((t, i) => plotText(`${i}:${t}→${labels[i + 1]}`)); }

export async function drawLoss(state, result, ablated) {
  const x = positionLabels(result.labels);
  const traces = [{ type: "bar", name: ablated ? "clean" : "loss", x, y: result.loss,
    marker: { color: result.copy_positions.map((c) => (c ? "#1f77b4" : "#aac")) } }];
  if (ablated) traces.push({ type: "bar", name: "ablated", x, y: ablated.loss, marker: { color: "#d62728" }, opacity: 0.7 });
  const layout = { barmode: "group", margin: { t: 25, r: 10, b: 40, l: 40 }, title: { text: "loss per prediction (dark: copy positions)", font: { size: 12 } },
    xaxis: { showticklabels: false, title: { text: "prediction (position → next token; hover for the tokens)", font: { size: 11 } } },
    yaxis: { title: { text: "cross-entropy (nats)", font: { size: 11 } } }, showlegend: !!ablated };
  await Plotly.react("loss-plot", traces, layout, PLOT);
  const copy = document.getElementById("copy-loss");
  copy.textContent = result.copy_loss === null ? "no repeats" : result.copy_loss.toFixed(3);
  copy.dataset.value = result.copy_loss ?? "";
  document.getElementById("mean-loss").textContent = result.mean_loss.toFixed(3);
}

// The loss view shows the newest of re-run and ablation: a response that arrives after a newer
// request is dropped, so the page never shows an older view over a newer one.
export async function runText(state) {
  const current = newest("loss");
  const result = await post("/api/model/loss", { ...modelRef(state), text: state.text });
  if (!current()) return result;
  document.getElementById("ablate-result").textContent = "–";
  await drawLoss(state, result, null);
  return result;
}

export async function drawHead(state) {
  const node = state.selected;
  const panel = document.getElementById("head-panel");
  panel.hidden = !node;
  document.getElementById("select-hint").hidden = !!node;
  if (!node) return;
  document.getElementById("head-title").textContent = node.head === null ? `Layer ${node.layer} MLP` : `Head L${node.layer}H${node.head}`;
  for (const id of ["attention-plot", "head-scores-plot", "qk-plot", "ov-plot", "circuits-note"]) document.getElementById(id).hidden = node.head === null;
  document.getElementById("head-scores-note").hidden = true;  // drawHeadScores decides
  if (node.head === null) return;
  const current = newest("head");
  const ref = { ...modelRef(state), layer: node.layer, head: node.head };
  const [attention, weights] = await Promise.all([
    post("/api/model/attention", { ...ref, text: state.text }),
    post("/api/model/weights", ref),
  ]);
  if (!current()) return;
  const axis = attention.labels.map((t, i) => plotText(`${i}:${t}`));
  await Plotly.react("attention-plot", [{ type: "heatmap", z: attention.pattern, x: axis, y: axis, colorscale: "Blues", reversescale: true,
    hovertemplate: "query %{y} → key %{x}: %{z:.3f}<extra></extra>", colorbar: { title: { text: "attention weight", side: "right", font: { size: 10 } } } }],
    { title: { text: "attention on the text (query ↓, key →)", font: { size: 12 } }, margin: { t: 30, r: 10, b: 70, l: 75 },
      yaxis: { autorange: "reversed", tickfont: { size: 8 }, title: { text: "query (position:token)", font: { size: 11 } } },
      xaxis: { tickfont: { size: 8 }, title: { text: "key (position:token)", font: { size: 11 } } } }, PLOT);
  // Circuits on token axes: every token, or the top-k the server chose (the note says which), or
  // none, with the reason, for a model without per-head weights.
  document.getElementById("circuits-note").textContent = weights.space === "hidden" ? `No QK / OV circuits: ${weights.note}.`
    : `QK and OV circuits over ${weights.note}.`;
  const circuitAxis = weights.labels.map((t, i) => plotText(String(weights.tokens[i]) === t ? t : `${weights.tokens[i]}:${t}`));
  const circuit = (id, z, title, rows, columns, value) => Plotly.react(id, [{ type: "heatmap", z, x: circuitAxis, y: circuitAxis, colorscale: "RdBu", zmid: 0,
    hovertemplate: "%{y} → %{x}: %{z:.3f}<extra></extra>", colorbar: { title: { text: value, side: "right", font: { size: 10 } } } }],
    { title: { text: title, font: { size: 12 } }, margin: { t: 30, r: 10, b: 70, l: 85 },
      yaxis: { autorange: "reversed", tickfont: { size: 8 }, title: { text: rows, font: { size: 11 } } },
      xaxis: { tickfont: { size: 8 }, title: { text: columns, font: { size: 11 } } } }, PLOT);
  for (const id of ["qk-plot", "ov-plot"]) document.getElementById(id).hidden = weights.space === "hidden";
  if (weights.space !== "hidden") {
    await circuit("qk-plot", weights.qk, "QK circuit (query token ↓, key token →)", "query token", "key token", "attention score (logit)");
    await circuit("ov-plot", weights.ov, "OV circuit (attended token ↓, promoted logit →)", "attended token", "promoted token", "logit contribution");
  }
  await drawHeadScores(state, node);
}

// The head's weight-refined LLC rows (the llc probe with components=heads), fetched once per run.
async function loadHeadLLC(state) {
  if (!state.run) return null;
  if (!state.llcRows || state.llcRows.run !== state.run) {
    const run = state.run;
    const rows = await get(`/api/runs/${enc(run)}/metrics?probe=llc&metric=llc&prefer=${PREFER}`).catch(() => null);
    if (run === state.run) state.llcRows = rows && { ...rows, run };
  }
  return state.llcRows;
}

// The head's scores over training (rows of the heads probe), with its rLLC on a second axis where the
// run has it, or, where the run has no scores, a note that says how to get them instead of empty axes.
async function drawHeadScores(state, node) {
  const rows = state.headRows;
  const traces = [];
  const llc = await loadHeadLLC(state);
  const llcPick = { step: [], probe: [], metric: [], layer: [], head: [], value: [], source: [] };
  for (let i = 0; llc && i < llc.step.length; i++) {
    if (llc.layer[i] === node.layer && llc.head[i] === node.head) {
      for (const k of Object.keys(llcPick)) llcPick[k].push(llc[k][i]);
    }
  }
  for (const metric of ["induction", "prev_token", "duplicate"]) {
    const pick = { step: [], probe: [], metric: [], layer: [], head: [], value: [], source: [] };
    for (let i = 0; rows && i < rows.step.length; i++) {
      if (rows.metric[i] === metric && rows.layer[i] === node.layer && rows.head[i] === node.head) {
        for (const k of Object.keys(pick)) pick[k].push(rows[k][i]);
      }
    }
    for (const s of toSeries(pick)) traces.push({ type: "scatter", mode: "lines+markers", name: metric, x: s.x, y: s.y });
  }
  const refined = toSeries(llcPick).map(s => ({ type: "scatter", mode: "lines+markers", name: "rLLC (weight-refined λ̂)",
    x: s.x, y: s.y, yaxis: "y2", line: { dash: "dot", color: "#3060b0" } }));
  traces.push(...refined);
  const plot = document.getElementById("head-scores-plot");
  const note = document.getElementById("head-scores-note");
  plot.hidden = !traces.length;
  note.hidden = !!traces.length;
  if (!traces.length) {
    Plotly.purge(plot);
    note.textContent = state.run ? "No head scores over training in this run yet: phaselens probe RUN --probes heads measures them on every checkpoint."
      : "Head scores over training come from a run's checkpoints; this model was given without a run.";
    return;
  }
  await Plotly.react(plot, traces, { title: { text: "head scores over training", font: { size: 12 } },
    margin: { t: 30, r: refined.length ? 45 : 10, b: 35, l: 50 }, xaxis: { title: { text: "step" } },
    yaxis: { range: [0, 1], title: { text: "score (attention on the pattern, 0–1)", font: { size: 10 } } },
    ...(refined.length ? { yaxis2: { overlaying: "y", side: "right", title: { text: "rLLC λ̂ (weight-refined)", font: { size: 10 } } } } : {}),
    shapes: [{ type: "line", xref: "x", yref: "paper", x0: state.step ?? 0, x1: state.step ?? 0, y0: 0, y1: 1, line: { color: "#d33" } }] }, PLOT);
}

export async function ablate(state) {
  const node = state.selected;
  if (!node) throw new Error("click a head or an MLP first");
  const started = performance.now();
  const mode = document.getElementById("ablate-mode").value;
  const current = newest("loss");
  const result = await post("/api/model/ablate", { ...modelRef(state), text: state.text, nodes: [node], mode,
    reference_text: document.getElementById("reference-text").value });
  if (!current()) return result;
  await drawLoss(state, result.clean, result.ablated);
  const out = document.getElementById("ablate-result");
  const before = result.clean.copy_loss, after = result.ablated.copy_loss;
  out.dataset.before = before ?? "";
  out.dataset.after = after ?? "";
  out.textContent = before === null ? `mean loss ${result.clean.mean_loss.toFixed(3)} → ${result.ablated.mean_loss.toFixed(3)}`
    : `copy-position loss ${before.toFixed(3)} → ${after.toFixed(3)} (${after >= before ? "+" : ""}${(after - before).toFixed(3)} nats)`;
  out.dataset.seq = String(Number(out.dataset.seq || 0) + 1);
  document.dispatchEvent(new CustomEvent("phaselens:ablated", { detail: { ms: performance.now() - started } }));
  return result;
}

export async function patch(state) {
  const value = (id) => document.getElementById(id).value;
  // An empty box sends null (the server's default); anything else goes as typed, for the server to check.
  const optional = (id) => (value(id).trim() === "" ? null : Number(value(id)));
  const result = await post("/api/model/patch", { ...modelRef(state), clean_text: value("patch-clean"), corrupted_text: value("patch-corrupted"),
    hook: value("patch-hook"), layer: Number(value("patch-layer")), head: value("patch-hook") === "head" ? Number(value("patch-head")) : null,
    position: optional("patch-position"), answer: optional("patch-answer"), wrong: optional("patch-wrong") });
  const out = document.getElementById("patch-result");
  out.dataset.answer = result.answer;
  out.dataset.wrong = result.wrong;
  out.dataset.patched = result.patched_logit_diff;
  out.dataset.seq = String(Number(out.dataset.seq || 0) + 1);
  out.textContent =
    `${result.hook_name}: logit(${result.answer}:${result.answer_label}) − logit(${result.wrong}:${result.wrong_label}) clean ${result.clean_logit_diff.toFixed(3)}, ` +
    `corrupted ${result.corrupted_logit_diff.toFixed(3)}, patched ${result.patched_logit_diff.toFixed(3)}` +
    (result.recovered === null ? "" : ` (recovered ${(100 * result.recovered).toFixed(1)}%)`);
  return result;
}

export async function gradients(state) {
  const position = document.getElementById("grad-position").value;
  const result = await post("/api/model/gradients", { ...modelRef(state), text: state.text, position: position === "" ? null : Number(position) });
  await Plotly.react("grad-plot", [{ type: "bar", x: result.labels.map((t, i) => plotText(`${i}:${t}`)), y: result.grad_norm, marker: { color: "#2ca02c" } }],
    { title: { text: `‖∂loss/∂embedding‖ per token (loss ${result.loss.toFixed(3)})`, font: { size: 12 } }, margin: { t: 30, r: 10, b: 40, l: 60 },
      xaxis: { showticklabels: false, title: { text: "input token (hover for it)", font: { size: 11 } } },
      yaxis: { title: { text: "‖∂loss/∂embedding‖ (L2, nats per unit)", font: { size: 10 } } } }, PLOT);
  return result;
}

export { guarded };
