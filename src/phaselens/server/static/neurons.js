// Neurons view: shown only when the run has neuron reports (RUN/artifacts/neurons/*.json).
import { get, enc, fillOptions, plotText } from "./api.js";

export async function loadNeurons(state) {
  const section = document.getElementById("neurons-view");
  const report = await get(`/api/runs/${enc(state.run)}/neurons`).catch(() => ({ available: false }));
  section.hidden = !report.available;
  if (!report.available) return;
  const layerSelect = document.getElementById("neuron-layer");
  const statSelect = document.getElementById("neuron-stat");
  const neuronSelect = document.getElementById("neuron-select");
  const layers = report.layers;
  fillOptions(layerSelect, layers.map((l, i) => [String(i), `layer ${l.layer} (${l.name})`]));
  const drawHistogram = () => {
    const layer = layers[Number(layerSelect.value)];
    if (!layer) { Plotly.purge("neuron-hist"); return; }
    const stats = Object.keys(layer.values);
    if (!stats.includes(statSelect.value)) fillOptions(statSelect, stats);
    const values = (layer.values[statSelect.value] || []).filter((v) => v !== null);  // null: no value (never fired)
    Plotly.react("neuron-hist", [{ type: "histogram", x: values, nbinsx: 50, marker: { color: "#9467bd" } }],
      { title: { text: plotText(`${layer.name}: ${statSelect.value} over ${values.length} neurons`), font: { size: 12 } },
        margin: { t: 30, r: 10, b: 45, l: 55 }, xaxis: { title: { text: plotText(STAT_AXES[statSelect.value] || statSelect.value), font: { size: 11 } } },
        yaxis: { type: "log", title: { text: "neurons (log scale)", font: { size: 11 } } } }, { displaylogo: false, responsive: true });
  };
  // The neuron list and its contexts follow the layer: only the chosen layer's most selective neurons.
  const fillNeurons = () => {
    const layer = layers[Number(layerSelect.value)];
    fillOptions(neuronSelect, report.neurons.map((n, i) => [n, i]).filter(([n]) => layer && n.layer === layer.name).map(([n, i]) =>
      [String(i), `${n.layer} #${n.neuron} (fires on ${(100 * n.firing_rate).toFixed(2)}%)`]));
  };
  const drawContexts = () => {
    const neuron = report.neurons[Number(neuronSelect.value)];
    const list = document.getElementById("neuron-contexts");
    list.replaceChildren();
    for (const c of neuron ? neuron.contexts : []) {
      // The text before, the activating token highlighted, the text after (newlines shown as ↵).
      const item = document.createElement("li");
      const value = document.createElement("span");
      value.className = "neuron-value";
      value.textContent = Number(c.value).toPrecision(3) + "  ";
      const token = document.createElement("mark");
      token.textContent = visible(c.token);
      item.append(value, visible(c.before), token, visible(c.after));
      list.appendChild(item);
    }
  };
  layerSelect.onchange = () => { drawHistogram(); fillNeurons(); drawContexts(); };
  statSelect.onchange = drawHistogram;
  neuronSelect.onchange = drawContexts;
  drawHistogram();
  fillNeurons();
  drawContexts();
}

// The histogram's x-axis title of each statistic of `NeuronLayer.STATISTICS`, with its unit.
const STAT_AXES = {
  firing_rate: "firing rate (fraction of tokens the neuron is positive on)",
  selectivity: "selectivity (max / mean activation)",
  mean: "mean activation",
  max: "max activation",
};

function visible(text) {
  return String(text).replace(/\n/g, "↵").replace(/\t/g, "⇥");
}
