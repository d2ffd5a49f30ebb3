// The model explorer page: plain JS talking to the JSON API of mnist_ablation.serve.
"use strict";

const DRAWING_SIZE = 112;  // the pad is sent at 112x112; the server crops, scales to 20x20 and centres it
const state = {
  runs: [], runId: null, compareId: null, ensemble: null,  // compareId "" = compare with nothing
  input: null,            // {drawing: [...]} or {image: [...]}, the current thing to classify
  modelImage: null,       // 28x28 in [0, 1] as the model sees it
  examples: {label: null, predicted: null, offset: 0},
};

const $ = (selector) => document.querySelector(selector);

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
    if (!response.ok) throw new Error(payload.detail ? JSON.stringify(payload.detail) : response.statusText);
    return payload;
  } finally {
    trackBusy(-1);
  }
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.style.color = isError ? "var(--wrong)" : "";
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
$("#clear-button").addEventListener("click", () => {
  clearPad(); state.input = null; state.modelImage = null;
  $("#model-input").getContext("2d").clearRect(0, 0, 140, 140);
  for (const id of ["#primary-result", "#compare-result"]) renderBars($(id), null);
  for (const id of ["#saliency", "#gradcam"]) $(id).getContext("2d").clearRect(0, 0, 140, 140);
  $("#activations").textContent = "Draw a digit, or pick a test image below, to see the activations.";
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
  container.querySelector(".predicted").textContent = result ? String(result.predicted_class) : "–";
  container.querySelector(".predicted").dataset.predicted = result ? result.predicted_class : "";
  const bars = container.querySelector(".bars");
  if (!bars.children.length) {
    for (let digit = 0; digit < 10; digit++) {
      bars.insertAdjacentHTML("beforeend",
        `<div class="bar-row"><span class="digit">${digit}</span><div class="bar-track"><div class="bar-fill"></div></div>` +
        `<span class="value"></span></div>`);
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
  container.innerHTML = "";
  for (const layer of result.layers) {
    const block = document.createElement("div");
    block.className = "layer";
    const [h, w, c] = layer.shape;
    block.innerHTML = `<div class="layer-title">${layer.layer} — ${h}×${w}×${c}</div><div class="maps"></div>`;
    for (const channel of layer.channels) {
      const canvas = document.createElement("canvas");
      canvas.width = w; canvas.height = h;
      canvas.title = `channel ${channel.channel}, mean ${channel.mean.toFixed(3)}, max ${channel.max.toFixed(3)}`;
      paintArray(canvas, channel.map, (v) => heatColour(v / 255));
      block.querySelector(".maps").appendChild(canvas);
    }
    container.appendChild(block);
  }
}

// ---------- test-set browser ----------
async function loadConfusion() {
  const table = $("#confusion");
  table.innerHTML = "<tr><td class='muted'>loading…</td></tr>";
  const result = await api(`/api/runs/${state.runId}/confusion`);
  $("#test-summary").textContent =
    `${runLabel(state.runId)}: ${(100 * result.accuracy).toFixed(2)}% of ${result.total.toLocaleString()} correct`;
  const m = result.matrix;
  let offMax = 1;
  m.forEach((row, i) => row.forEach((n, j) => { if (i !== j) offMax = Math.max(offMax, n); }));
  let html = "<tr><th></th><th colspan='10'>predicted →</th></tr><tr><th>true ↓</th>";
  for (let j = 0; j < 10; j++) html += `<th>${j}</th>`;
  html += "</tr>";
  m.forEach((row, i) => {
    const rowTotal = row.reduce((a, b) => a + b, 0) || 1;
    html += `<tr><th>${i}</th>`;
    row.forEach((n, j) => {
      let background = "#f7f8fa", colour = "";
      if (i === j) {
        const t = n / rowTotal;
        background = `rgba(37, 99, 235, ${0.12 + 0.78 * t})`; colour = t > 0.5 ? "#fff" : "";
      } else if (n > 0) {
        const t = Math.log1p(n) / Math.log1p(offMax);
        background = `rgba(220, 38, 38, ${0.1 + 0.75 * t})`; colour = t > 0.6 ? "#fff" : "";
      }
      html += `<td class="cm-cell${n === 0 ? " zero" : ""}" data-label="${i}" data-predicted="${j}" ` +
        `style="background:${background};color:${colour}" title="true ${i}, predicted ${j}: ${n}">${n}</td>`;
    });
    html += "</tr>";
  });
  table.innerHTML = html;
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
  const sort = $("#sort-select").value;
  const result = await api(`/api/runs/${state.runId}/examples?label=${label}&predicted=${predicted}` +
    `&sort=${sort}&limit=24&offset=${state.examples.offset}`);
  const kind = label === predicted ? "correct" : "mistakes";
  $("#examples-title").textContent =
    `True ${label} → predicted ${predicted}: ${result.total} ${kind}` + (result.total ? "" : " (none)");
  const container = $("#examples");
  if (!append) container.innerHTML = "";
  for (const example of result.examples) container.appendChild(exampleCard(example));
  state.examples.offset += result.examples.length;
  $("#more-button").classList.toggle("hidden", state.examples.offset >= result.total);
}

function exampleCard(example) {
  const card = document.createElement("div");
  card.className = "example";
  card.dataset.index = example.index;
  const canvas = document.createElement("canvas");
  canvas.width = 28; canvas.height = 28;
  paintArray(canvas, example.image, grey);
  const wrong = example.label !== example.predicted;
  const bars = example.probabilities.map((p, k) => {
    const cls = k === example.predicted ? "pred" : (k === example.label ? "true" : "");
    return `<div class="${cls}" style="height:${Math.max(1, 20 * p).toFixed(1)}px" title="${k}: ${(100 * p).toFixed(1)}%"></div>`;
  }).join("");
  card.innerHTML = `<div class="caption">#${example.index} · ${example.label} → ` +
    `<span class="${wrong ? "wrong" : ""}">${example.predicted}</span></div>` +
    `<div class="caption muted">p=${example.confidence.toFixed(3)}</div><div class="mini-bars">${bars}</div>`;
  card.prepend(canvas);
  card.title = "Click to explain this image above";
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
  if (!points.length) { container.innerHTML = `<p class="muted">${title}: not logged</p>`; return; }
  const epochs = points.map((p) => p.epoch), values = points.map((p) => p.value);
  const xMin = Math.min(...epochs), xMax = Math.max(...epochs, xMin + 1);
  let yMin = Math.min(...values), yMax = Math.max(...values);
  if (yMax - yMin < 1e-9) { yMin -= 0.05 * Math.abs(yMin || 1); yMax += 0.05 * Math.abs(yMax || 1); }
  const x = (e) => left + (e - xMin) / (xMax - xMin) * (width - left - right);
  const y = (v) => top + (1 - (v - yMin) / (yMax - yMin)) * (height - top - bottom);
  let svg = `<svg viewBox="0 0 ${width} ${height}" role="img" aria-label="${title}">` +
    `<text class="title" x="${left}" y="14">${title}</text>`;
  for (let k = 0; k <= 4; k++) {
    const v = yMin + (yMax - yMin) * k / 4;
    svg += `<line x1="${left}" x2="${width - right}" y1="${y(v)}" y2="${y(v)}" stroke="#eceef2"/>` +
      `<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${yFormat(v)}</text>`;
  }
  const epochTicks = [...new Set(epochs)].sort((a, b) => a - b);
  const step = Math.ceil(epochTicks.length / 8);
  epochTicks.filter((_, i) => i % step === 0).forEach((e) => {
    svg += `<text x="${x(e)}" y="${height - bottom + 16}" text-anchor="middle">${e + 1}</text>`;
  });
  svg += `<text x="${(left + width - right) / 2}" y="${height - 4}" text-anchor="middle">epoch</text>`;
  series.forEach((s, i) => {
    const ps = s.points.filter((p) => p.value !== null);
    if (!ps.length) return;
    svg += `<polyline fill="none" stroke="${s.colour}" stroke-width="2" points="${ps.map((p) => `${x(p.epoch)},${y(p.value)}`).join(" ")}"/>`;
    ps.forEach((p) => { svg += `<circle cx="${x(p.epoch)}" cy="${y(p.value)}" r="3" fill="${s.colour}"/>`; });
    svg += `<rect x="${width - right - 110}" y="${6 + 14 * i}" width="10" height="3" fill="${s.colour}"/>` +
      `<text x="${width - right - 96}" y="${11 + 14 * i}">${s.name}</text>`;
  });
  container.innerHTML = svg + "</svg>";
}

async function loadTraining() {
  const run = await api(`/api/runs/${state.runId}`);
  $("#mlflow-link").href = run.mlflow_url;
  const percent = (v) => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(2)}%`;
  const number = (v, digits) => (v === null || v === undefined) ? "–" : Number(v).toFixed(digits);
  const m = run.metrics;
  let rows = `<tr class="group"><td colspan="2">${run.label} <span class="muted small">${run.run_id.slice(0, 8)}</span></td></tr>` +
    `<tr><td>test accuracy</td><td>${percent(m.test_accuracy)}</td></tr>` +
    `<tr><td>test loss</td><td>${number(m.test_loss, 4)}</td></tr>` +
    `<tr><td>final val accuracy</td><td>${percent(m.val_accuracy)}</td></tr>` +
    `<tr><td>training time</td><td>${number(m.train_seconds, 1)} s</td></tr>` +
    `<tr class="group"><td colspan="2">config</td></tr>`;
  for (const [key, value] of Object.entries(run.params)) rows += `<tr><td>${key}</td><td>${value}</td></tr>`;
  $("#metrics-table").innerHTML = rows;
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
  runSelect.innerHTML = state.runs.map((r) =>
    `<option value="${r.run_id}">${r.label}${r.test_accuracy !== null ? ` — test ${(100 * r.test_accuracy).toFixed(2)}%` : ""}</option>`).join("");
  runSelect.value = state.runId;
  const others = state.runs.filter((r) => r.run_id !== state.runId);
  compareSelect.innerHTML = `<option value="">nothing</option>` +
    others.map((r) => `<option value="${r.run_id}">${r.label}</option>`).join("") +
    (state.ensemble ? `<option value="${state.ensemble}">ensemble of all ${state.runs.length} runs</option>` : "");
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
  $("#examples").innerHTML = ""; $("#examples-title").textContent = "Click a cell of the confusion matrix.";
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
    loadConfusion().catch((e) => { $("#confusion").innerHTML = ""; setStatus(`test set unavailable: ${e.message}`, true); }),
  ]);
}

async function start() {
  clearPad();
  for (let digit = 0; digit < 10; digit++) $("#target-select").insertAdjacentHTML("beforeend", `<option value="${digit}">${digit}</option>`);
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
