// vramfit serve page: POST /v1/jobs, then follow GET /v1/jobs/{id}/events (server-sent events).
// Plain browser JavaScript, no framework and no CDN, so the page works offline.
"use strict";

const STAGES = ["encode", "denoise", "decode"];
const TERMINAL = new Set(["done", "error", "cancelled"]);
const $ = (id) => document.getElementById(id);

let job = null; // {id, source, started, stageStart, stageTimes, finished}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const init = {method, headers: headers(body ? {"Content-Type": "application/json"} : {})};
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* a body that is not JSON: the status says enough */ }
  return {status: r.status, headers: r.headers, data};
}

function errorText(status, data, headersIn) {
  const e = data && data.error ? data.error : {};
  let msg = e.message || `HTTP ${status}`;
  const retry = headersIn && headersIn.get && headersIn.get("Retry-After");
  if (retry) msg += ` (retry after ${retry} s)`;
  return msg;
}

// ------------------------------------------------------------------ server line
async function showServer() {
  try {
    const r = await api("GET", "/v1/status");
    if (r.status !== 200 || !r.data) { $("server").textContent = errorText(r.status, r.data); return; }
    const s = r.data;
    const parts = [];
    if (s.model) parts.push(s.model);
    if (s.mode) parts.push(s.mode);
    const recipe = s.recipe || (s.plan && s.plan.recipe);
    if (recipe) parts.push("recipe " + recipe);
    if (s.stages && typeof s.stages === "object") {
      const resident = Object.entries(s.stages).filter(([, v]) => v && v.resident).map(([k]) => k);
      parts.push("resident: " + (resident.length ? resident.join(", ") : "none"));
    }
    $("server").textContent = parts.join(" · ") || "ready";
  } catch (err) {
    $("server").textContent = "server unreachable: " + err;
  }
}

// ------------------------------------------------------------------ progress
function setBar(stage, value) {
  const bar = $("bar-" + stage);
  if (value === null) bar.removeAttribute("value"); // indeterminate: running, no step count for this stage
  else bar.value = value;
  bar.closest(".stage").classList.toggle("active", value === null || (value > 0 && value < 1));
}

function enterStage(stage) {
  const k = STAGES.indexOf(stage);
  if (k < 0) return;
  const now = performance.now();
  if (job.stage && job.stage !== stage) job.stageTimes[job.stage] = (job.stageTimes[job.stage] || 0) + (now - job.stageStart) / 1000;
  job.stage = stage;
  job.stageStart = now;
  STAGES.forEach((s, i) => { if (i < k) setBar(s, 1); });
  if (stage === "denoise") setBar("denoise", job.lastStep || 0);
  else setBar(stage, null);
  setState(stage);
  $("queue").textContent = "";
}

function setState(state) {
  const el = $("state");
  el.textContent = state;
  el.className = "badge " + state;
}

// ------------------------------------------------------------------ images
function asImageSrc(item, fmt) {
  // an event's image is a URL, a bare base64 string, or an object with url / b64_json
  if (item && typeof item === "object") {
    if (item.url) return item.url;
    if (item.b64_json) return `data:image/${item.output_format || fmt || "png"};base64,${item.b64_json}`;
    return null;
  }
  if (typeof item !== "string") return null;
  if (item.startsWith("/") || item.startsWith("http") || item.startsWith("data:")) return item;
  return `data:image/${fmt || "png"};base64,${item}`;
}

async function addImage(container, src, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  if ($("apikey").value.trim() && !src.startsWith("data:")) {
    // <img src> cannot send an Authorization header: fetch the bytes and show them from a blob
    const r = await fetch(src, {headers: headers()});
    if (!r.ok) { showError(`image ${src}: HTTP ${r.status}`); return; }
    img.src = URL.createObjectURL(await r.blob());
  } else {
    img.src = src;
  }
  container.appendChild(img);
  return img;
}

// ------------------------------------------------------------------ run facts
function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    const name = prefix ? `${prefix}.${k}` : k;
    if (typeof v === "number") out.push([name, v]);
    else if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, name, out);
  }
  return out;
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.innerHTML = "";
  for (const [k, v] of rows) {
    const tr = document.createElement("tr");
    const a = document.createElement("th"); a.textContent = k;
    const b = document.createElement("td"); b.textContent = Number.isInteger(v) ? v : v.toFixed(3);
    tr.append(a, b);
    body.appendChild(tr);
  }
}

function findRunInfo(...sources) {
  // the done event or GET /v1/jobs/{id} carry {recipe, timings, memory}, at top level or under vramfit/result
  for (const s of sources) {
    if (!s) continue;
    for (const c of [s.vramfit, s.result && s.result.vramfit, s.result, s]) {
      if (c && (c.recipe || c.timings || c.memory)) return c;
    }
  }
  return null;
}

function recipeText(r) {
  // a recipe string, or each stage's slice of it: {encode: {text_encoder: "bf16", ...}, denoise: {...}, ...}
  if (!r) return "";
  if (typeof r === "string") return r;
  return Object.entries(r).map(([stage, slice]) => {
    if (!slice || typeof slice !== "object") return `${stage}: ${slice}`;
    return `${stage}: ` + Object.entries(slice).map(([k, v]) => `${k}=${v}`).join(",");
  }).join("  |  ");
}

function showRun(info) {
  const wall = (performance.now() - job.started) / 1000;
  $("run").hidden = false;
  $("recipe").textContent = recipeText(info && info.recipe) || "(not reported)";
  const timings = flatten(info && info.timings, "", []);
  timings.push(["wall (this page)", wall]);
  for (const s of STAGES) if (job.stageTimes[s] && !(info && info.timings)) timings.push([`${s} (this page)`, job.stageTimes[s]]);
  fillTable("timings", timings);
  // sizes only (keys in GB); counters such as a stage's batch size are not memory
  fillTable("memory", flatten(info && info.memory, "", []).filter(([k]) => k.endsWith("_gb"))
    .map(([k, v]) => [k.replace(/_gb$/, ""), v]));
}

// ------------------------------------------------------------------ events
function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = false;
}

async function finish(state) {
  if (job.finished) return;
  job.finished = true;
  if (job.stage) job.stageTimes[job.stage] = (job.stageTimes[job.stage] || 0) + (performance.now() - job.stageStart) / 1000;
  if (job.source) job.source.close();
  if (job.abort) job.abort.abort();
  setState(state);
  $("cancel").disabled = true;
  $("submit").disabled = false;
}

async function onEvent(ev) {
  if (!job || job.finished) return;
  switch (ev.type) {
    case "queued":
      setState("queued");
      $("queue").textContent = ev.position != null ? `queue position ${ev.position}` : "queued";
      break;
    case "stage":
      enterStage(ev.stage);
      break;
    case "step":
      if (job.stage !== "denoise") enterStage("denoise");
      job.lastStep = ev.n ? ev.i / ev.n : 0;
      setBar("denoise", job.lastStep);
      $("steps-text").textContent = `${ev.i}/${ev.n}`;
      break;
    case "partial": {
      const src = asImageSrc(ev.b64_json ? {b64_json: ev.b64_json, output_format: ev.output_format} : ev.url);
      if (src) {
        const box = $("previews");
        box.innerHTML = ""; // the newest preview replaces the last one
        await addImage(box, src, `preview ${ev.index ?? ev.partial_image_index ?? ""}`);
      }
      break;
    }
    case "done": {
      STAGES.forEach((s) => setBar(s, 1));
      $("previews").innerHTML = "";
      const images = ev.images || (ev.data || []);
      for (const [i, item] of images.entries()) {
        const src = asImageSrc(item, ev.output_format);
        if (src) await addImage($("images"), src, `image ${i + 1}`);
      }
      await finish("done");
      let info = findRunInfo(ev);
      if (!info) {
        const r = await api("GET", `/v1/jobs/${job.id}`);
        info = findRunInfo(r.data);
      }
      showRun(info);
      break;
    }
    case "error":
      showError((ev.error && ev.error.message) || "the job failed");
      await finish(ev.error && ev.error.code === "cancelled" ? "cancelled" : "error");
      break;
    case "cancelled":
      showError("cancelled");
      await finish("cancelled");
      break;
  }
}

function parseData(raw) {
  try { return JSON.parse(raw); } catch (_) { return null; }
}

async function pollUntilEnd() {
  // the event stream broke off: ask for the job's state until it ends, so the page never hangs silently
  while (job && !job.finished) {
    const r = await api("GET", `/v1/jobs/${job.id}`);
    if (r.status !== 200 || !r.data) { showError(errorText(r.status, r.data, r.headers)); await finish("error"); return; }
    const s = r.data;
    if (s.state === "done") {
      await onEvent({type: "done", images: s.images || (s.result && (s.result.images || s.result.data)) || [], vramfit: s.vramfit || (s.result && s.result.vramfit)});
      return;
    }
    if (s.state === "error" || s.state === "cancelled") {
      await onEvent({type: s.state, error: s.error});
      return;
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

function followWithEventSource(url) {
  const es = new EventSource(url);
  job.source = es;
  const handle = (e) => { const d = parseData(e.data); if (d) onEvent(d.type ? d : Object.assign({type: e.type}, d)); };
  es.onmessage = handle; // events sent as plain `data: {"type": ...}`
  // events sent with an `event:` name reach only their named listener
  for (const t of ["queued", "stage", "step", "partial", "done", "cancelled"]) es.addEventListener(t, handle);
  es.addEventListener("error", (e) => {
    if (e.data) { handle(e); return; } // a named `event: error` from the server
    if (!job.finished) { es.close(); pollUntilEnd(); } // the connection itself failed
  });
}

async function followWithFetch(url) {
  // EventSource cannot send an Authorization header; with an API key read the stream with fetch instead
  job.abort = new AbortController();
  try {
    const r = await fetch(url, {headers: headers({Accept: "text/event-stream"}), signal: job.abort.signal});
    if (!r.ok) { const d = await r.json().catch(() => null); showError(errorText(r.status, d, r.headers)); await finish("error"); return; }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        let name = "message", data = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        const d = parseData(data.join("\n"));
        if (d) await onEvent(d.type ? d : Object.assign({type: name}, d));
      }
    }
  } catch (err) {
    if (job.finished) return;
  }
  if (!job.finished) pollUntilEnd();
}

// ------------------------------------------------------------------ form
function requestBody() {
  const body = {
    prompt: $("prompt").value,
    size: $("size").value.trim(),
    n: parseInt($("n").value, 10),
    response_format: "url",
    partial_images: parseInt($("partial").value || "0", 10),
  };
  const steps = $("steps").value.trim();
  if (steps) body.steps = parseInt(steps, 10);
  const seed = $("seed").value.trim();
  if (seed) body.seed = parseInt(seed, 10);
  return body;
}

function resetJobView() {
  $("job").hidden = false;
  $("error").hidden = true;
  $("images").innerHTML = "";
  $("previews").innerHTML = "";
  $("run").hidden = true;
  $("steps-text").textContent = "";
  $("queue").textContent = "";
  STAGES.forEach((s) => setBar(s, 0));
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (job && !job.finished) return;
  resetJobView();
  $("submit").disabled = true;
  job = {id: null, started: performance.now(), stageTimes: {}, finished: false};
  setState("submitting");
  let r;
  try {
    r = await api("POST", "/v1/jobs", requestBody());
  } catch (err) {
    showError("server unreachable: " + err);
    await finish("error");
    return;
  }
  if (r.status !== 202 && r.status !== 200) {
    showError(errorText(r.status, r.data, r.headers));
    await finish("error");
    return;
  }
  job.id = r.data.id;
  $("job-id").textContent = job.id;
  $("cancel").disabled = false;
  setState("queued");
  const url = r.data.events || `/v1/jobs/${job.id}/events`;
  if ($("apikey").value.trim()) followWithFetch(url);
  else followWithEventSource(url);
});

$("cancel").addEventListener("click", async () => {
  if (!job || job.finished) return;
  const r = await api("DELETE", `/v1/jobs/${job.id}`);
  if (r.status >= 400) showError(errorText(r.status, r.data, r.headers));
  else { showError("cancelled"); await finish("cancelled"); }
});

// the key stays in this browser (localStorage), so a reload does not ask again
$("apikey").value = localStorage.getItem("vramfit-api-key") || "";
$("apikey").addEventListener("change", () => {
  localStorage.setItem("vramfit-api-key", $("apikey").value.trim());
  showServer();
});
showServer();
