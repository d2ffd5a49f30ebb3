// The model explorer page: plain JS talking to the JSON API of mnist_ablation.serve.
// Every string from the server (run labels, param names and values, layer names) goes into the page as text:
// DOM nodes, textContent and attributes only, never HTML parsing (innerHTML and friends).
"use strict";

const DRAWING_SIZE = 112;  // the pad is sent at 112x112; the server crops, scales to 20x20 and centres it
const SVG_NS = "http://www.w3.org/2000/svg";
const state = {
  runs: [], runId: null, compareId: null, ensemble: null,  // compareId "" = compare with nothing
  input: null,            // {drawing: [...]} or {image: [...]}, the current thing to classify
  modelImage: null,       // 28x28 in [0, 1] as the model sees it
  examples: {label: null, predicted: null, offset: 0},
};

const $ = (selector) => document.querySelector(selector);

// An element with attributes (class, dataset keys as data-*, anything else via setAttribute) and children
// (nodes, or strings, which become text nodes).
function element(tag, attributes = {}, ...children) {
  return fill(document.createElement(tag), attributes, children);
}
function svgElement(tag, attributes = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attributes, children);
}
function fill(node, attributes, children) {
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === "") continue;
    if (key === "class") node.setAttribute("class", value);
    else node.setAttribute(key, String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined).map(
    (child) => (child instanceof Node ? child : String(child))));
  return node;
}

// Requests in flight and started, mirrored in <body data-busy data-requests> so tests can tell when the page settled.
let inFlight = 0, started = 0;
function trackBusy(change) {
  inFlight += change;
  if (change > 0) started += change;
  document.body.dataset.busy = inFlight > 0 ? "1" : "0";
  document.body.dataset.requests = String(started);
}

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  trackBusy(+1);
  try {
    const response = await fetch(path, options);
    const payload = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail);
      throw new Error(detail || response.statusText);
    }
    return payload;
  } finally {
    trackBusy(-1);
  }
}
const runPath = (runId, suffix = "") => `/api/runs/${encodeURIComponent(runId)}${suffix}`;

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function runLabel(runId) {
  if (runId === state.ensemble) return "ensemble of all runs";
  const run = state.runs.find((r) => r.run_id === runId);
  return run ? run.label : runId;
}

// ---------- colour maps and image drawing ----------
const HEAT_STOPS = [[0, 0, 0], [120, 20, 130], [220, 50, 50], [250, 170, 30], [255, 255, 160]];
function heatColour(t) {
  const x = Math.min(0.9999, Math.max(0, t)) * (HEAT_STOPS.length - 1);
  const i = Math.floor(x), f = x - i, a = HEAT_STOPS[i], b = HEAT_STOPS[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f));
}

// Paint a 2-D array onto a canvas, one cell per pixel, then scale it up to the canvas size.
function paintArray(canvas, rows, pixel, smooth = false) {
  const height = rows.length, width = rows[0].length;
  const small = document.createElement("canvas");
  small.width = width; small.height = height;
  const context = small.getContext("2d");
  const data = context.createImageData(width, height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) {
    const [r, g, b] = pixel(rows[y][x], y, x), o = 4 * (y * width + x);
    data.data[o] = r; data.data[o + 1] = g; data.data[o + 2] = b; data.data[o + 3] = 255;
  }
  context.putImageData(data, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = smooth;
  target.clearRect(0, 0, canvas.width, canvas.height);
  target.drawImage(small, 0, 0, canvas.width, canvas.height);
}
const grey = (v) => [v, v, v];

// Heat over the digit: the digit in grey, the heat map blended on top where it is strong.
function paintOverlay(canvas, image, heat, smooth) {
  paintArray(canvas, image, (v, y, x) => {
    const h = heat[y][x] / 255, base = v * 0.55, colour = heatColour(h);
    return colour.map((c) => Math.round(base * (1 - h) + c * h));
  }, smooth);
}

// ---------- drawing pad ----------
const pad = $("#pad");
const padContext = pad.getContext("2d");
function clearPad() {
  padContext.fillStyle = "#000";
  padContext.fillRect(0, 0, pad.width, pad.height);
}
let drawing = false, last = null;
function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}
pad.addEventListener("pointerdown", (event) => {
  drawing = true; last = padPoint(event); pad.setPointerCapture(event.pointerId);
  stroke(last, last);
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const point = padPoint(event);
  stroke(last, point); last = point;
  schedulePrediction();
});
const endStroke = () => {
  if (!drawing) return;
  drawing = false; schedulePrediction(); scheduleExplanation();
};
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
function stroke(from, to) {
  padContext.strokeStyle = "#fff"; padContext.lineWidth = 20; padContext.lineCap = "round"; padContext.lineJoin = "round";
  padContext.beginPath(); padContext.moveTo(...from); padContext.lineTo(...to); padContext.stroke();
}
const NO_ACTIVATIONS = "Draw a digit, or pick a test image below, to see the activations.";
$("#clear-button").addEventListener("click", () => {
  clearPad(); state.input = null; state.modelImage = null;
  $("#model-input").getContext("2d").clearRect(0, 0, 140, 140);
  for (const id of ["#primary-result", "#compare-result"]) renderBars($(id), null);
  for (const id of ["#saliency", "#gradcam"]) $(id).getContext("2d").clearRect(0, 0, 140, 140);
  $("#activations").classList.add("muted");
  $("#activations").replaceChildren(NO_ACTIVATIONS);
});

function padDrawing() {
  const small = document.createElement("canvas");
  small.width = DRAWING_SIZE; small.height = DRAWING_SIZE;
  const context = small.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(pad, 0, 0, DRAWING_SIZE, DRAWING_SIZE);
  const pixels = context.getImageData(0, 0, DRAWING_SIZE, DRAWING_SIZE).data;
  const rows = [];
  for (let y = 0; y < DRAWING_SIZE; y++) {
    const row = new Array(DRAWING_SIZE);
    for (let x = 0; x < DRAWING_SIZE; x++) row[x] = Math.round(pixels[4 * (y * DRAWING_SIZE + x)] / 0.255) / 1000;
    rows.push(row);
  }
  return rows;
}

// ---------- live prediction (at most one request in flight; the latest drawing wins) ----------
let predictionBusy = false, predictionPending = false;
function schedulePrediction() {
  state.input = {drawing: padDrawing()};
  if (predictionBusy) { predictionPending = true; return; }
  predict();
}
async function predict() {
  if (!state.input) return;
  predictionBusy = true; predictionPending = false;
  try {
    const requests = [api("/api/predict", {...state.input, run_id: state.runId})];
    if (state.compareId) requests.push(api("/api/predict", {...state.input, run_id: state.compareId}));
    const [primary, compare] = await Promise.all(requests);
    if (primary.image) state.modelImage = primary.image;
    if (state.modelImage) paintArray($("#model-input"), state.modelImage, (v) => grey(Math.round(v * 255)));
    renderBars($("#primary-result"), primary);
    if (compare) renderBars($("#compare-result"), compare);
    setStatus("");
  } catch (error) {
    setStatus(`prediction failed: ${error.message}`, true);
  } finally {
    predictionBusy = false;
    if (predictionPending) predict();
  }
}

function renderBars(container, result) {
  const predicted = container.querySelector(".predicted");
  predicted.textContent = result ? String(result.predicted_class) : "–";
  predicted.dataset.predicted = result ? String(result.predicted_class) : "";
  const bars = container.querySelector(".bars");
  if (!bars.children.length) {
    for (let digit = 0; digit < 10; digit++) {
      bars.append(element("div", {class: "bar-row"},
        element("span", {class: "digit"}, String(digit)),
        element("div", {class: "bar-track"}, element("div", {class: "bar-fill"})),
        element("span", {class: "value"})));
    }
  }
  [...bars.children].forEach((row, digit) => {
    const p = result ? result.probabilities[digit] : 0;
    row.querySelector(".bar-fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".value").textContent = result ? `${(100 * p).toFixed(1)}%` : "";
    row.classList.toggle("top", !!result && digit === result.predicted_class);
  });
}

// ---------- explanations (after a stroke ends or a test image is picked) ----------
let explanationTimer = null;
function scheduleExplanation() {
  clearTimeout(explanationTimer);
  explanationTimer = setTimeout(explain, 150);
}
async function explain() {
  if (!state.input) return;
  const target = $("#target-select").value;
  const body = {...state.input, run_id: state.runId};
  if (target !== "") body.target_class = Number(target);
  try {
    const [saliency, activations] = await Promise.all([
      api("/api/saliency", body), api("/api/activations", {...body, max_channels: 16})]);
    const image = saliency.image.map((row) => row.map((v) => v / 255));
    paintOverlay($("#saliency"), image, saliency.saliency, false);
    paintOverlay($("#gradcam"), image, saliency.gradcam, true);
    const flat = saliency.gradcam.flat();
    $("#gradcam-caption").textContent = Math.max(...flat) === 0
      ? `Grad-CAM (${saliency.gradcam_layer}): no region argues for class ${saliency.target_class}`
      : `Grad-CAM on ${saliency.gradcam_layer}, class ${saliency.target_class}`;
    renderActivations(activations);
  } catch (error) {
    setStatus(`explanation failed: ${error.message}`, true);
  }
}
$("#target-select").addEventListener("change", explain);

function renderActivations(result) {
  const container = $("#activations");
  container.classList.remove("muted");
  container.replaceChildren(...result.layers.map((layer) => {
    const [h, w, c] = layer.shape;
    const maps = element("div", {class: "maps"}, ...layer.channels.map((channel) => {
      const canvas = element("canvas", {width: w, height: h,
        title: `channel ${channel.channel}, mean ${channel.mean.toFixed(3)}, max ${channel.max.toFixed(3)}`});
      paintArray(canvas, channel.map, (v) => heatColour(v / 255));
      return canvas;
    }));
    return element("div", {class: "layer"}, element("div", {class: "layer-title"}, `${layer.layer} — ${h}×${w}×${c}`), maps);
  }));
}

// ---------- test-set browser ----------
function confusionCell(n, i, j, rowTotal, offMax) {
  const cell = element("td", {class: n === 0 ? "cm-cell zero" : "cm-cell", "data-label": i, "data-predicted": j,
    title: `true ${i}, predicted ${j}: ${n}`}, String(n));
  let background = "#f7f8fa", colour = "";
  if (i === j) {
    const t = n / rowTotal;
    background = `rgba(37, 99, 235, ${0.12 + 0.78 * t})`; colour = t > 0.5 ? "#fff" : "";
  } else if (n > 0) {
    const t = Math.log1p(n) / Math.log1p(offMax);
    background = `rgba(220, 38, 38, ${0.1 + 0.75 * t})`; colour = t > 0.6 ? "#fff" : "";
  }
  cell.style.background = background;  // CSSOM, not a style attribute: allowed by the page's CSP
  cell.style.color = colour;
  return cell;
}

async function loadConfusion() {
  const table = $("#confusion");
  table.replaceChildren(element("tr", {}, element("td", {class: "muted"}, "loading…")));
  const result = await api(runPath(state.runId, "/confusion"));
  $("#test-summary").textContent =
    `${runLabel(state.runId)}: ${(100 * result.accuracy).toFixed(2)}% of ${result.total.toLocaleString()} correct`;
  const m = result.matrix;
  let offMax = 1;
  m.forEach((row, i) => row.forEach((n, j) => { if (i !== j) offMax = Math.max(offMax, n); }));
  const digits = [...Array(10).keys()];
  const rows = [
    element("tr", {}, element("th"), element("th", {colspan: 10}, "predicted →")),
    element("tr", {}, element("th", {}, "true ↓"), ...digits.map((j) => element("th", {}, String(j)))),
    ...m.map((row, i) => {
      const rowTotal = row.reduce((a, b) => a + b, 0) || 1;
      return element("tr", {}, element("th", {}, String(i)),
        ...row.map((n, j) => confusionCell(n, i, j, rowTotal, offMax)));
    }),
  ];
  table.replaceChildren(...rows);
  table.querySelectorAll("td.cm-cell").forEach((cell) => cell.addEventListener("click", () => {
    table.querySelectorAll("td.selected").forEach((c) => c.classList.remove("selected"));
    cell.classList.add("selected");
    state.examples = {label: Number(cell.dataset.label), predicted: Number(cell.dataset.predicted), offset: 0};
    loadExamples(false);
  }));
}

async function loadExamples(append) {
  const {label, predicted} = state.examples;
  if (label === null) return;
  const query = new URLSearchParams({label, predicted, sort: $("#sort-select").value, limit: 24,
                                     offset: state.examples.offset});
  const result = await api(runPath(state.runId, `/examples?${query}`));
  const kind = label === predicted ? "correct" : "mistakes";
  $("#examples-title").textContent =
    `True ${label} → predicted ${predicted}: ${result.total} ${kind}` + (result.total ? "" : " (none)");
  const container = $("#examples");
  if (!append) container.replaceChildren();
  for (const example of result.examples) container.append(exampleCard(example));
  state.examples.offset += result.examples.length;
  $("#more-button").classList.toggle("hidden", state.examples.offset >= result.total);
}

function exampleCard(example) {
  const canvas = element("canvas", {width: 28, height: 28});
  paintArray(canvas, example.image, grey);
  const wrong = example.label !== example.predicted;
  const bars = example.probabilities.map((p, k) => {
    const cls = k === example.predicted ? "pred" : (k === example.label ? "true" : "");
    const bar = element("div", {class: cls, title: `${k}: ${(100 * p).toFixed(1)}%`});
    bar.style.height = `${Math.max(1, 20 * p).toFixed(1)}px`;
    return bar;
  });
  const card = element("div", {class: "example", "data-index": example.index, title: "Click to explain this image above"},
    canvas,
    element("div", {class: "caption"}, `#${example.index} · ${example.label} → `,
      element("span", {class: wrong ? "wrong" : ""}, String(example.predicted))),
    element("div", {class: "caption muted"}, `p=${example.confidence.toFixed(3)}`),
    element("div", {class: "mini-bars"}, ...bars));
  card.addEventListener("click", () => useTestImage(example));
  return card;
}

// A test image becomes the current input: shown on the pad and explained like a drawing.
function useTestImage(example) {
  const image = example.image.map((row) => row.map((v) => v / 255));
  state.input = {image};
  state.modelImage = image;
  paintArray(pad, example.image, grey, true);
  predict(); explain();
  $("#draw-section").scrollIntoView({behavior: "smooth"});
}

$("#sort-select").addEventListener("change", () => { state.examples.offset = 0; loadExamples(false); });
$("#more-button").addEventListener("click", () => loadExamples(true));

// ---------- training curves and metrics ----------
function lineChart(container, title, series, yFormat) {
  const width = 420, height = 230, left = 48, right = 12, top = 26, bottom = 34;
  const points = series.flatMap((s) => s.points.filter((p) => p.value !== null));
  if (!points.length) { container.replaceChildren(element("p", {class: "muted"}, `${title}: not logged`)); return; }
  const epochs = points.map((p) => p.epoch), values = points.map((p) => p.value);
  const xMin = Math.min(...epochs), xMax = Math.max(...epochs, xMin + 1);
  let yMin = Math.min(...values), yMax = Math.max(...values);
  if (yMax - yMin < 1e-9) { yMin -= 0.05 * Math.abs(yMin || 1); yMax += 0.05 * Math.abs(yMax || 1); }
  const x = (e) => left + (e - xMin) / (xMax - xMin) * (width - left - right);
  const y = (v) => top + (1 - (v - yMin) / (yMax - yMin)) * (height - top - bottom);
  const svg = svgElement("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title},
    svgElement("text", {class: "title", x: left, y: 14}, title));
  for (let k = 0; k <= 4; k++) {
    const v = yMin + (yMax - yMin) * k / 4;
    svg.append(svgElement("line", {x1: left, x2: width - right, y1: y(v), y2: y(v), stroke: "#eceef2"}),
      svgElement("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, yFormat(v)));
  }
  const epochTicks = [...new Set(epochs)].sort((a, b) => a - b);
  const step = Math.ceil(epochTicks.length / 8);
  epochTicks.filter((_, i) => i % step === 0).forEach((e) => {
    svg.append(svgElement("text", {x: x(e), y: height - bottom + 16, "text-anchor": "middle"}, String(e + 1)));
  });
  svg.append(svgElement("text", {x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle"}, "epoch"));
  series.forEach((s, i) => {
    const ps = s.points.filter((p) => p.value !== null);
    if (!ps.length) return;
    svg.append(svgElement("polyline", {fill: "none", stroke: s.colour, "stroke-width": 2,
      points: ps.map((p) => `${x(p.epoch)},${y(p.value)}`).join(" ")}));
    ps.forEach((p) => svg.append(svgElement("circle", {cx: x(p.epoch), cy: y(p.value), r: 3, fill: s.colour})));
    svg.append(svgElement("rect", {x: width - right - 110, y: 6 + 14 * i, width: 10, height: 3, fill: s.colour}),
      svgElement("text", {x: width - right - 96, y: 11 + 14 * i}, s.name));
  });
  container.replaceChildren(svg);
}

// Only http(s) links from the server become hrefs; anything else (say javascript:) is dropped.
function safeHref(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return ["http:", "https:"].includes(parsed.protocol) ? parsed.href : "#";
  } catch (error) {
    return "#";
  }
}

async function loadTraining() {
  const run = await api(runPath(state.runId));
  $("#mlflow-link").href = safeHref(run.mlflow_url);
  const percent = (v) => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(2)}%`;
  const number = (v, digits) => (v === null || v === undefined) ? "–" : Number(v).toFixed(digits);
  const m = run.metrics;
  const row = (name, value) => element("tr", {}, element("td", {}, name), element("td", {}, value));
  const group = (...children) => element("tr", {class: "group"}, element("td", {colspan: 2}, ...children));
  $("#metrics-table").replaceChildren(
    group(`${run.label} `, element("span", {class: "muted small"}, run.run_id.slice(0, 8))),
    row("test accuracy", percent(m.test_accuracy)),
    row("test loss", number(m.test_loss, 4)),
    row("final val accuracy", percent(m.val_accuracy)),
    row("training time", `${number(m.train_seconds, 1)} s`),
    group("config"),
    ...Object.entries(run.params).map(([key, value]) => row(key, value)));
  const h = run.history;
  lineChart($("#loss-chart"), "Loss", [
    {name: "train", points: h.loss, colour: "#2563eb"}, {name: "validation", points: h.val_loss, colour: "#f59e0b"}],
    (v) => v.toFixed(2));
  lineChart($("#accuracy-chart"), "Accuracy", [
    {name: "train", points: h.accuracy, colour: "#2563eb"}, {name: "validation", points: h.val_accuracy, colour: "#f59e0b"}],
    (v) => `${(100 * v).toFixed(1)}%`);
}

// ---------- run selection ----------
function fillSelects() {
  const runSelect = $("#run-select"), compareSelect = $("#compare-select");
  runSelect.replaceChildren(...state.runs.map((r) => new Option(
    r.label + (r.test_accuracy !== null ? ` — test ${(100 * r.test_accuracy).toFixed(2)}%` : ""), r.run_id)));
  runSelect.value = state.runId;
  const others = state.runs.filter((r) => r.run_id !== state.runId);
  compareSelect.replaceChildren(new Option("nothing", ""), ...others.map((r) => new Option(r.label, r.run_id)),
    ...(state.ensemble ? [new Option(`ensemble of all ${state.runs.length} runs`, state.ensemble)] : []));
  if (state.compareId === null || state.compareId === state.runId ||
      ![...compareSelect.options].some((o) => o.value === state.compareId)) {
    state.compareId = others.length ? others[0].run_id : "";
  }
  compareSelect.value = state.compareId;
  compareSelect.disabled = state.runs.length < 2;
  updateCompareVisibility();
}
function updateCompareVisibility() {
  $("#primary-result .run-name").textContent = runLabel(state.runId);
  $("#compare-result .run-name").textContent = state.compareId ? runLabel(state.compareId) : "";
  $("#compare-result").classList.toggle("hidden", !state.compareId);
}
$("#run-select").addEventListener("change", async (event) => {
  state.runId = event.target.value;
  fillSelects();
  state.examples = {label: null, predicted: null, offset: 0};
  $("#examples").replaceChildren();
  $("#examples-title").textContent = "Click a cell of the confusion matrix.";
  $("#more-button").classList.add("hidden");
  await refreshRun();
  predict(); explain();
});
$("#compare-select").addEventListener("change", (event) => {
  state.compareId = event.target.value; updateCompareVisibility(); predict();
});

async function refreshRun() {
  await Promise.all([
    loadTraining().catch((e) => setStatus(`training curves unavailable: ${e.message}`, true)),
    loadConfusion().catch((e) => { $("#confusion").replaceChildren(); setStatus(`test set unavailable: ${e.message}`, true); }),
  ]);
}

async function start() {
  clearPad();
  $("#target-select").append(...[...Array(10).keys()].map((digit) => new Option(String(digit), String(digit))));
  renderBars($("#primary-result"), null); renderBars($("#compare-result"), null);
  try {
    const offered = await api("/api/runs");
    state.runs = offered.runs; state.runId = offered.default_run_id; state.ensemble = offered.ensemble;
    fillSelects();
    await refreshRun();
  } catch (error) {
    setStatus(`cannot reach the server: ${error.message}`, true);
  }
}
start();
