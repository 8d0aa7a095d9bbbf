// The draw/upload page: a drawing pad and a file picker feed POST v1/predict; the answer (what its verdict
// means: a digit, "not sure: 4 or 9?", or "not a digit"), the probability of every digit and the 28×28 image
// the model saw are shown next to the model card from GET v1/models.
// Plain modern JS, no build step, no third-party code. URLs are relative so the page also works behind a
// path prefix.
"use strict";

const API = { predict: "v1/predict", models: "v1/models" };
const STROKE_WIDTH = 22;           // on the 280-px pad: about the stroke of an MNIST digit once scaled
const PREDICT_DELAY_MS = 350;      // after the pen lifts; a new stroke within it cancels the request
const MAX_UPLOAD_SIDE = 1024;      // larger photos are scaled down here before they are sent
const MAX_UPLOAD_BYTES = 1_500_000;
const KEY_STORAGE = "mnist-serve.api-key";

const $ = (id) => document.getElementById(id);
const els = {
  pad: $("pad"), placeholder: $("pad-placeholder"), clear: $("clear-button"), predict: $("predict-button"),
  dropZone: $("drop-zone"), fileInput: $("file-input"), fileName: $("file-name"), preview: $("upload-preview"),
  result: $("result"), digit: $("result-digit"), confidence: $("result-confidence"), summary: $("result-summary"),
  headline: $("result-headline"), detail: $("result-detail"), confidenceLine: $("confidence-line"),
  bars: $("bars"), seen: $("seen"), error: $("error"),
  keyForm: $("api-key-form"), keyInput: $("api-key-input"),
  modelName: $("model-name"), modelVersion: $("model-version"), modelAccuracy: $("model-accuracy"),
  modelTrustRow: $("model-trust-row"), modelTrust: $("model-trust"), modelTrustHint: $("model-trust-hint"),
};

// ---------------------------------------------------------------------------------------------------------
// Drawing pad

const pad = els.pad.getContext("2d");
let padHasInk = false;
let activePointer = null;
let lastPoint = null;
let predictTimer = 0;

function resetPad() {
  pad.fillStyle = "#000";
  pad.fillRect(0, 0, els.pad.width, els.pad.height);
  padHasInk = false;
  els.placeholder.hidden = false;
}

function padPoint(event) {
  // The canvas keeps 280×280 pixels whatever size CSS gives it.
  const box = els.pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) / box.width) * els.pad.width,
    y: ((event.clientY - box.top) / box.height) * els.pad.height,
  };
}

function strokeTo(point) {
  pad.strokeStyle = "#fff";
  pad.fillStyle = "#fff";
  pad.lineWidth = STROKE_WIDTH;
  pad.lineCap = "round";
  pad.lineJoin = "round";
  if (!lastPoint) {
    pad.beginPath();
    pad.arc(point.x, point.y, STROKE_WIDTH / 2, 0, Math.PI * 2);
    pad.fill();
  } else {
    pad.beginPath();
    pad.moveTo(lastPoint.x, lastPoint.y);
    pad.lineTo(point.x, point.y);
    pad.stroke();
  }
  lastPoint = point;
}

els.pad.addEventListener("pointerdown", (event) => {
  if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  clearTimeout(predictTimer);
  activePointer = event.pointerId;
  els.pad.setPointerCapture(event.pointerId);
  if (source.kind !== "pad") {
    // Drawing after a photo starts a new digit: the dimmed old drawing is not part of it.
    resetPad();
    useSource({ kind: "pad" });
  }
  lastPoint = null;
  strokeTo(padPoint(event));
  padHasInk = true;
  els.placeholder.hidden = true;
});

els.pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== activePointer) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) strokeTo(padPoint(e));
});

function endStroke(event) {
  if (event.pointerId !== activePointer) return;
  activePointer = null;
  lastPoint = null;
  clearTimeout(predictTimer);
  predictTimer = setTimeout(predict, PREDICT_DELAY_MS);
}
els.pad.addEventListener("pointerup", endStroke);
els.pad.addEventListener("pointercancel", endStroke);

els.clear.addEventListener("click", () => {
  clearTimeout(predictTimer);
  resetPad();
  useSource({ kind: "pad" });
  showIdle();
});

els.predict.addEventListener("click", () => {
  clearTimeout(predictTimer);
  predict();
});

// ---------------------------------------------------------------------------------------------------------
// Photo or scan: file picker, drag and drop, paste

// What Predict sends: the pad, or the last photo given.
let source = { kind: "pad" };

function useSource(next) {
  source = next;
  const isFile = next.kind === "file";
  els.dropZone.classList.toggle("has-file", isFile);
  els.preview.hidden = !isFile;
  // The pad stays as drawn but steps back while a photo is what Predict sends.
  els.pad.parentElement.classList.toggle("inactive", isFile);
  els.fileName.textContent = isFile ? next.file.name || "pasted image" : "";
  if (!isFile) els.fileInput.value = "";
}

async function takeFile(file) {
  if (!file) return;
  clearTimeout(predictTimer);
  useSource({ kind: "file", file });
  await drawPreview(file);
  predict();
}

async function drawPreview(file) {
  const ctx = els.preview.getContext("2d");
  ctx.clearRect(0, 0, els.preview.width, els.preview.height);
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(els.preview.width / bitmap.width, els.preview.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.drawImage(bitmap, (els.preview.width - w) / 2, (els.preview.height - h) / 2, w, h);
    bitmap.close();
  } catch {
    // Not decodable here (the server may still read it); leave the preview empty.
  }
}

els.fileInput.addEventListener("change", () => takeFile(els.fileInput.files[0]));

for (const type of ["dragenter", "dragover"]) {
  els.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    els.dropZone.classList.add("dragging");
  });
}
els.dropZone.addEventListener("dragleave", (event) => {
  if (!els.dropZone.contains(event.relatedTarget)) els.dropZone.classList.remove("dragging");
});
els.dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  els.dropZone.classList.remove("dragging");
  const file = [...(event.dataTransfer?.files ?? [])].find((f) => f.type.startsWith("image/"))
    ?? event.dataTransfer?.files?.[0];
  takeFile(file);
});
// A file dropped next to the zone should not make the browser navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items ?? [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) takeFile(item.getAsFile());
});

// ---------------------------------------------------------------------------------------------------------
// Talking to the service

let requestSeq = 0;       // only the answer to the latest request is shown
let inFlight = null;      // AbortController of the latest request

function apiKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function canvasBlob(canvas, type = "image/png", quality) {
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("could not encode the image"))), type, quality);
  });
}

// Photos straight from a phone can be several megabytes; the model needs 28×28, so large ones are scaled
// down (keeping their orientation) before they travel. Small files are sent as they are.
async function uploadBytes(file) {
  let bitmap = null;
  try { bitmap = await createImageBitmap(file); } catch { /* the server will say what is wrong */ }
  const large = bitmap && Math.max(bitmap.width, bitmap.height) > MAX_UPLOAD_SIDE;
  if (bitmap && (large || file.size > MAX_UPLOAD_BYTES)) {
    const scale = Math.min(1, MAX_UPLOAD_SIDE / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";    // transparent areas of a PNG read as paper
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    return new Uint8Array(await (await canvasBlob(canvas, "image/jpeg", 0.92)).arrayBuffer());
  }
  bitmap?.close();
  return new Uint8Array(await file.arrayBuffer());
}

async function predict() {
  if (source.kind === "pad" && !padHasInk) {
    showIdle("Draw a digit first, or choose a photo.");
    return;
  }
  const seq = ++requestSeq;
  inFlight?.abort();
  const controller = new AbortController();
  inFlight = controller;
  setState("loading");
  try {
    const bytes = source.kind === "file"
      ? await uploadBytes(source.file)
      : new Uint8Array(await (await canvasBlob(els.pad)).arrayBuffer());
    const response = await fetch(API.predict, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "application/json" }),
      body: JSON.stringify({ image_base64: bytesToBase64(bytes), return_image: true, top_k: 3 }),
      signal: controller.signal,
    });
    const body = await response.json().catch(() => null);
    if (seq !== requestSeq) return;
    if (response.status === 401) {
      showKeyForm(body);
      return;
    }
    if (!response.ok) throw new ServiceError(response.status, body);
    await showPrediction(body);
  } catch (error) {
    if (seq !== requestSeq || error.name === "AbortError") return;
    showError(error);
  }
}

class ServiceError extends Error {
  constructor(status, body) {
    const detail = body?.error ?? {};
    super(detail.message || `The service answered ${status}.`);
    this.status = status;
    this.code = detail.code || `http_${status}`;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Showing the answer

function setState(state) {
  els.result.dataset.state = state;
  els.result.setAttribute("aria-busy", state === "loading" ? "true" : "false");
}

// Rounding must not claim certainty the model did not give: 0.99996 shows as ">99.9%", not "100.0%".
function percent(p, digits = 1) {
  const step = 10 ** -digits;
  const value = p * 100;
  if (value > 0 && value < step) return `<${step.toFixed(digits)}%`;
  if (value < 100 && value > 100 - step) return `>${(100 - step).toFixed(digits)}%`;
  return `${value.toFixed(digits)}%`;
}

function buildBars() {
  for (let d = 0; d <= 9; d++) {
    const li = document.createElement("li");
    li.className = "bar";
    li.dataset.digit = String(d);
    li.innerHTML = `<span class="bar-label">${d}</span>`
      + `<span class="bar-track" aria-hidden="true"><span class="bar-fill"></span></span>`
      + `<span class="bar-value">–</span>`;
    els.bars.append(li);
  }
}

// `marked`: the digits the answer names (the best one, or the two an unsure answer hesitates between; none
// for an image that is not a digit), drawn in the accent colour and in bold.
function showBars(probabilities, marked) {
  els.bars.querySelectorAll(".bar").forEach((li, d) => {
    const p = probabilities[d] ?? 0;
    li.querySelector(".bar-fill").style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    li.querySelector(".bar-value").textContent = percent(p);
    li.classList.toggle("best", d === marked[0]);
    li.classList.toggle("candidate", marked.includes(d));
    li.setAttribute("aria-label", `${d}: ${percent(p)}`);
  });
}

// The summary is the live region: a headline for the answers that need one, then a sentence.
function setSummary(headline, detail) {
  els.headline.textContent = headline ?? "";
  els.headline.hidden = !headline;
  els.detail.textContent = detail;
}

function clearVerdict() {
  delete els.result.dataset.verdict;
  els.confidenceLine.hidden = false;
}

function showIdle(message = "Draw a digit or choose a photo to see what the model reads.") {
  requestSeq++;
  inFlight?.abort();
  setState("idle");
  clearVerdict();
  els.digit.textContent = "–";
  els.confidence.textContent = "–";
  setSummary(null, message);
  els.error.hidden = true;
  els.bars.querySelectorAll(".bar").forEach((li) => {
    li.querySelector(".bar-fill").style.width = "0";
    li.querySelector(".bar-value").textContent = "–";
    li.classList.remove("best", "candidate");
    li.removeAttribute("aria-label");
  });
  clearSeen();
}

const VERDICTS = ["digit", "unsure", "not_a_digit"];

// The two most likely digits with their probabilities: from top_k when the service sent it, else from the
// probabilities.
function topTwo(body, probabilities) {
  const listed = Array.isArray(body.top_k)
    ? body.top_k
      .filter((c) => Number.isInteger(c?.digit) && typeof c.probability === "number")
      .map((c) => ({ digit: c.digit, p: c.probability }))
    : [];
  if (listed.length >= 2) return listed.slice(0, 2);
  return probabilities.map((p, digit) => ({ digit, p })).sort((a, b) => b.p - a.p).slice(0, 2);
}

function digitPair(first, second) {
  const part = (text, className) => {
    const span = document.createElement("span");
    span.textContent = text;
    if (className) span.className = className;
    return span;
  };
  return [part(String(first)), part(" or ", "or"), part(String(second))];
}

async function showPrediction(body) {
  const probabilities = Array.isArray(body.probabilities) ? body.probabilities.map(Number) : [];
  const digit = Number.isInteger(body.digit) ? body.digit : probabilities.indexOf(Math.max(...probabilities));
  const confidence = typeof body.confidence === "number" ? body.confidence : probabilities[digit] ?? 0;
  // A service from before verdicts sends none: its answers are plain digits.
  const verdict = VERDICTS.includes(body.verdict) ? body.verdict : "digit";
  els.error.hidden = true;
  els.keyForm.hidden = true;
  els.result.dataset.verdict = verdict;
  els.confidence.textContent = percent(confidence);
  els.confidenceLine.hidden = verdict === "not_a_digit";
  let marked = [digit];
  if (verdict === "not_a_digit") {
    // No digit to show: the box is struck through by the stylesheet, the words say why.
    els.digit.textContent = "";
    marked = [];
    setSummary(
      "That doesn't look like a digit",
      source.kind === "file"
        ? "Use a photo of one handwritten digit, cropped close around it."
        : "Draw one digit, large and centred on the pad.",
    );
  } else if (verdict === "unsure") {
    const [first, second] = topTwo(body, probabilities);
    marked = [first.digit, second.digit];
    els.digit.replaceChildren(...digitPair(first.digit, second.digit));
    setSummary(
      `Not sure: ${first.digit} or ${second.digit}?`,
      `Most likely ${first.digit} (${percent(first.p)}), then ${second.digit} (${percent(second.p)}). `
        + "The model may misread this one: check it yourself, or write it again more clearly.",
    );
  } else {
    els.digit.textContent = String(digit);
    setSummary(null, `The model reads ${digit}, with ${percent(confidence)} confidence.`);
  }
  if (probabilities.length === 10) showBars(probabilities, marked);
  await showSeen(body.image);
  setState("done");
}

function showError(error) {
  setState("error");
  clearVerdict();
  els.digit.textContent = "?";
  els.confidence.textContent = "–";
  setSummary(null, "No prediction.");
  const network = error instanceof TypeError;
  els.error.textContent = network ? "The service could not be reached. Is it running?" : error.message;
  els.error.dataset.code = error.code || (network ? "network" : "error");
  els.error.hidden = false;
}

function showKeyForm(body) {
  setState("error");
  clearVerdict();
  setSummary(null, "No prediction: the service needs an API key.");
  const rejected = Boolean(apiKey());
  els.error.textContent = rejected
    ? body?.error?.message || "That API key was not accepted."
    : "Enter the API key for this service to get predictions.";
  els.error.dataset.code = body?.error?.code || "unauthorized";
  els.error.hidden = false;
  els.keyForm.hidden = false;
  els.keyInput.focus();
}

els.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  try { sessionStorage.setItem(KEY_STORAGE, els.keyInput.value.trim()); } catch { /* private mode */ }
  els.keyInput.value = "";
  els.keyForm.hidden = true;
  predict();
});

// The service returns the image it classified; accept it as a base64 PNG (with or without a data: prefix)
// or as a 28×28 array of numbers (0..1 or 0..255). It is decoded without data: URLs so a strict
// Content-Security-Policy does not get in the way.
async function showSeen(image) {
  const ctx = els.seen.getContext("2d");
  if (image && typeof image === "object" && !Array.isArray(image)) {
    image = image.png_base64 ?? image.image_base64 ?? image.base64 ?? image.data ?? image.pixels;
  }
  try {
    if (typeof image === "string" && image.length) {
      const text = image.startsWith("data:") ? image.slice(image.indexOf(",") + 1) : image;
      const bitmap = await createImageBitmap(new Blob([base64ToBytes(text)]));
      ctx.imageSmoothingEnabled = false;
      ctx.clearRect(0, 0, 28, 28);
      ctx.drawImage(bitmap, 0, 0, 28, 28);
      bitmap.close();
    } else if (Array.isArray(image) && image.length) {
      const rows = image.map((row) => (Array.isArray(row) ? row.flat(Infinity) : [row]));
      const flat = rows.flat().map(Number);
      const max = Math.max(...flat);
      const scale = max <= 1 ? 255 : 1;
      const data = ctx.createImageData(28, 28);
      const side = Math.round(Math.sqrt(flat.length));
      for (let i = 0; i < 28 * 28; i++) {
        const v = side === 28 ? Math.round(Math.max(0, Math.min(255, flat[i] * scale))) : 0;
        data.data.set([v, v, v, 255], i * 4);
      }
      ctx.putImageData(data, 0, 0);
    } else {
      clearSeen();
      return;
    }
    els.seen.setAttribute("aria-label", "The 28 by 28 image the model saw, after preprocessing");
    els.seen.classList.add("filled");
  } catch {
    clearSeen();
  }
}

function clearSeen() {
  const ctx = els.seen.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 28, 28);
  els.seen.setAttribute("aria-label", "The 28 by 28 image the model saw: nothing yet");
  els.seen.classList.remove("filled");
}

// ---------------------------------------------------------------------------------------------------------
// Model card

// GET v1/models may answer one card, a list of cards, or {"models": [...]}; accuracy may sit at the top
// or under metrics. Of several, the default model is the one that answers the page.
function pickModel(body) {
  const list = Array.isArray(body) ? body : Array.isArray(body?.models) ? body.models
    : Array.isArray(body?.data) ? body.data : null;
  if (!list) return body;
  return list.find((card) => card?.default === true) ?? list[0];
}

// The service loads its model in the background, so right after a start the list can still be empty.
async function loadModelCard(attempt = 0) {
  try {
    const response = await fetch(API.models, { headers: headers({ Accept: "application/json" }) });
    if (!response.ok) throw new Error(String(response.status));
    const card = pickModel(await response.json());
    if (!card || card.ready === false) {
      if (attempt < 30) {
        setTimeout(() => loadModelCard(attempt + 1), 1000);
        if (card) showModelCard(card);
        return;
      }
      if (!card) throw new Error("no model");
    }
    showModelCard(card);
  } catch {
    els.modelName.textContent = els.modelVersion.textContent = els.modelAccuracy.textContent = "unavailable";
  }
}

function showModelCard(card) {
  const accuracy = card.accuracy ?? card.test_accuracy ?? card.metrics?.test_accuracy ?? card.metrics?.accuracy;
  els.modelName.textContent = card.name ?? "unknown";
  els.modelVersion.textContent = card.version ?? "unknown";
  els.modelAccuracy.textContent = typeof accuracy === "number" ? percent(accuracy, 2) : "not reported";
  if (typeof accuracy === "number") els.modelAccuracy.dataset.value = String(accuracy);
  const trust = trustHeadline(card.trust);
  els.modelTrust.textContent = trust ?? "";
  els.modelTrustRow.hidden = els.modelTrustHint.hidden = !trust;
}

// The card's trust section in one line: whether the confidence is calibrated, how many non-digits it turns
// away and how many real digits it holds back, all measured on held-out tests. Null when the card has none.
function trustHeadline(trust) {
  if (!trust || typeof trust !== "object") return null;
  const parts = [];
  const calibration = trust.calibration;
  if (calibration && typeof calibration === "object" && (calibration.method || calibration.temperature)) {
    const ece = calibration.test_after?.ece;
    parts.push(typeof ece === "number" ? `calibrated (test ECE ${percent(ece, 2)})` : "calibrated");
  }
  const families = Object.values(trust.ood?.held_out?.per_family ?? {})
    .filter((f) => typeof f?.not_digit_rate === "number");
  if (families.length) {
    const weight = (f) => (typeof f.images === "number" && f.images > 0 ? f.images : 1);
    const total = families.reduce((sum, f) => sum + weight(f), 0);
    const rejected = families.reduce((sum, f) => sum + f.not_digit_rate * weight(f), 0) / total;
    const least = trust.ood.held_out.min_family_not_digit_rate;
    parts.push(`rejects ${percent(rejected)} of non-digits in tests`
      + (typeof least === "number" ? ` (at least ${percent(least)} of each kind)` : ""));
  }
  const heldBack = trust.selective?.test_digits_rejected;
  if (typeof heldBack === "number") parts.push(`holds back ${percent(heldBack, 2)} of MNIST test digits`);
  const unsure = trust.verdict?.unsure_below_confidence;
  if (!parts.length && typeof unsure === "number" && unsure > 0) {
    parts.push(`answers “not sure” below ${percent(unsure)} confidence`);
  }
  if (!parts.length) return null;
  const line = parts.join("; ");
  return line[0].toUpperCase() + line.slice(1);
}

// ---------------------------------------------------------------------------------------------------------

buildBars();
resetPad();
clearSeen();
loadModelCard();
document.documentElement.dataset.ready = "true";
