// The demo page: reads the export folder's manifest.json, loads the tokenizer, drives the worker (worker.js) that
// downloads and runs the model, and streams decoded tokens into the page.
//
// URL parameters (all optional): model=URL of the export folder (default: model/, where `rwkv-export serve` puts
// it), variant=NAME, backend=wasm|webgpu|webgpu-native (rt_webgpu.js: hand-written WGSL kernels, no
// onnxruntime), threads=N, verify=0 (skip the sha256 check), autoload=1, sequence=0 (prompt
// through the step graph), warmup=N (JIT warm-up steps after load; worker.js says why), batch=N (webgpu-native:
// greedy steps a GPU batch, 1 = a round trip a token; rt_webgpu.js decodeGreedy), profile=1 (webgpu-native: time a
// token's kernels by kind after loading, in loadInfo.profile; rt_webgpu.js profile).
// window.rwkvDemo is a small API for tests and scripts: load(), generate(), stop(), encode(), decode(), status.

import { loadTokenizer } from './tokenizer.js';
import {
  fetchManifest, formatBytes, graphBytes, pickVariant, sequenceGraph, stepGraph, stepGraphs, suits, variants,
} from './manifest.js';
import { checkParams } from './sampling.js';
import { BACKEND as NATIVE, nativeWorker, unsupported as nativeUnsupported } from './rt_webgpu.js';
import { BACKEND as WASM_NATIVE, unsupported as wasmNativeUnsupported } from './rt_wasm.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const modelBase = new URL(params.get('model') || 'model/', location.href);
if (!modelBase.pathname.endsWith('/')) modelBase.pathname += '/';
const ortBase = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;

const demo = {
  status: 'starting',
  manifest: null,
  tokenizer: null,
  loadInfo: null,
  lastResult: null,
  error: null,
  notices: [],
};
window.rwkvDemo = demo;

let worker = null;
let eosId = null;
let pendingLoad = null; // {resolve, reject}
let pendingRun = null; // {resolve, reject, ...}

function setStatus(s) {
  demo.status = s;
  document.body.dataset.status = s;
  const idle = s === 'ready';
  $('generate').disabled = !idle;
  $('stop').disabled = s !== 'generating';
  $('load').disabled = !(s === 'setup' || s === 'ready' || s === 'load-failed');
  for (const id of ['variant', 'backend', 'threads', 'verify']) $(id).disabled = $('load').disabled;
}

// A fatal error: shown in the banner; the page stays usable where it can.
function showError(message, status = 'error') {
  const text = String(message).trim() || 'unknown error';
  demo.error = text;
  const el = $('error');
  el.hidden = false;
  el.textContent = text;
  setStatus(status);
}

function clearError() {
  demo.error = null;
  $('error').hidden = true;
  $('error').textContent = '';
}

function notice(message, kind = 'info') {
  demo.notices.push({ kind, message });
  const el = document.createElement('div');
  el.className = `banner ${kind}`;
  el.dataset.kind = kind;
  el.textContent = message;
  $('notices').append(el);
}

window.addEventListener('error', (e) => showError(`Unexpected error: ${e.message}`));
window.addEventListener('unhandledrejection', (e) => {
  const r = e.reason;
  showError(`Unexpected error: ${r && r.message ? r.message : r}`);
});

// ---- manifest + tokenizer ---------------------------------------------------------------------------------------

async function loadTokenizerFor(manifest) {
  const t = manifest.tokenizer;
  if (t.kind === 'bytes') return loadTokenizer({ kind: 'bytes', vocab_size: t.vocab_size ?? 256 });
  if (t.kind === 'hf-tokenizers') {
    const url = new URL(t.file, modelBase).href;
    const res = await fetch(url, { cache: 'no-cache' });
    if (!res.ok) throw new Error(`tokenizer ${url}: HTTP ${res.status}`);
    let json;
    try {
      json = await res.json();
    } catch (e) {
      throw new Error(`tokenizer ${url} is not valid JSON: ${e.message}`);
    }
    return loadTokenizer({ kind: 'hf-tokenizers', json });
  }
  if (t.kind === 'rwkv-world') {
    const url = new URL(t.file, modelBase).href;
    const res = await fetch(url, { cache: 'no-cache' });
    if (!res.ok) throw new Error(`tokenizer ${url}: HTTP ${res.status}`);
    return loadTokenizer({ kind: 'rwkv-world', vocab: await res.text(), vocab_size: t.vocab_size });
  }
  throw new Error(`the manifest's tokenizer kind '${t.kind}' is not supported by this demo`);
}

function describeModel(m) {
  const d = m.model;
  const src = d.source?.builtin ? `builtin:${d.source.builtin}` : (d.source?.file ?? 'checkpoint');
  // RWKV-5/6/7 have heads (the manifest's n_head / head_size); RWKV-4 has none
  const heads = Number.isInteger(d.n_head) ? ` (${d.n_head} head${d.n_head === 1 ? '' : 's'} of ${d.head_size})` : '';
  return `RWKV-${d.rwkv_version} · ${d.n_layer} layer${d.n_layer === 1 ? '' : 's'} × ${d.n_embd}${heads} · vocab ${d.vocab_size} · ${src} · ` +
    `tokenizer: ${m.tokenizer.kind}`;
}

async function probeWebGPUForLabel() {
  const opt = $('backend').querySelector('option[value="webgpu"]');
  let why = null;
  let shaderF16 = false;
  if (!navigator.gpu) why = 'no navigator.gpu';
  else {
    try {
      const adapter = await Promise.race([navigator.gpu.requestAdapter(), new Promise((r) => setTimeout(() => r(null), 3000))]);
      if (!adapter) why = 'no GPU adapter';
      else shaderF16 = adapter.features.has('shader-f16');
    } catch (e) {
      why = e.message;
    }
  }
  demo.webgpu = why ? { available: false, why } : { available: true, shaderF16 };
  opt.textContent = why ? 'WebGPU (unavailable → wasm)' : 'WebGPU';
  $('backend').querySelector(`option[value="${NATIVE}"]`).textContent = why ? 'WebGPU native (unavailable)' : 'WebGPU native (no onnxruntime)';
  if (why) $('env-note').textContent += ` WebGPU: unavailable here (${why}); choosing it falls back to wasm.`;
}

function fillSetup(m) {
  const vsel = $('variant');
  vsel.replaceChildren();
  for (const g of stepGraphs(m)) {
    const o = document.createElement('option');
    o.value = g.variant;
    const seq = sequenceGraph(m, g.variant) ? ' + prompt graph' : '';
    o.textContent = `${g.variant} (${formatBytes(graphBytes(m, g))}${seq})`;
    vsel.append(o);
  }
  const want = params.get('variant');
  if (want && !variants(m).includes(want)) notice(`variant '${want}' is not in this folder; using the default`, 'warn');
  variantChosen = Boolean(want && variants(m).includes(want));
  if (variantChosen) vsel.value = want;
  const tsel = $('threads');
  tsel.replaceChildren();
  const maxThreads = crossOriginIsolated ? Math.max(2, Math.min(navigator.hardwareConcurrency || 2, 8)) : 1;
  for (let n = 1; n <= maxThreads; n++) {
    const o = document.createElement('option');
    o.value = String(n);
    o.textContent = String(n);
    tsel.append(o);
  }
  tsel.value = String(Math.min(4, maxThreads)); // all cores up to 4 (2 here: 1.6x one thread at 169M int8)
  const wantThreads = params.get('threads');
  if (wantThreads) {
    if (Number(wantThreads) > maxThreads) notice(`threads=${wantThreads} is not possible here; using ${maxThreads}`, 'warn');
    else tsel.value = wantThreads;
  }
  if (params.get('verify') === '0') $('verify').checked = false;
  const wantBackend = params.get('backend');
  if (wantBackend) $('backend').value = wantBackend;
  else if (wasmNativeByDefault(m)) {
    // the fast CPU path where it runs: wasm native decodes 169M int8 4-5x faster than onnxruntime-web's wasm with
    // the same integers (README, wasm native); ?backend=wasm or the control picks onnxruntime-web
    $('backend').value = WASM_NATIVE;
    autoBackend = true;
  }
  if (params.get('prompt') != null) $('prompt').value = params.get('prompt');
  else $('prompt').value = defaultPrompt(m);
  $('env-note').textContent = crossOriginIsolated
    ? `Cross-origin isolated: multi-threaded wasm available (${navigator.hardwareConcurrency} logical cores).`
    : 'Not cross-origin isolated: wasm runs on 1 thread (serve with `rwkv-export serve`, which sends COOP/COEP).';
  const g = m.generation || {};
  if (g.temperature != null) $('temperature').value = g.temperature;
  if (g.top_p != null) $('top_p').value = g.top_p;
  if (g.min_p_ratio != null) $('min_p_ratio').value = g.min_p_ratio;
  if (g.min_p_power != null) $('min_p_power').value = g.min_p_power;
}

// wasm native is the default backend where it runs: an RWKV-4 int8 (dynamic-int7) variant, a cross-origin isolated
// page (its helper threads share memory) and WebAssembly relaxed SIMD (RELAXED_SIMD_PROBE: a module of one
// i32x4.relaxed_dot_i8x16_i7x16_add_s). If it then fails to load, the page falls back to onnxruntime-web's wasm and
// says so (demo.load below).
const RELAXED_SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 8, 1, 96, 3, 123, 123, 123, 1, 123, 3, 2, 1,
  0, 10, 13, 1, 11, 0, 32, 0, 32, 1, 32, 2, 253, 147, 2, 11]);
let autoBackend = false; // the backend control holds wasm native because the page chose it, not the user
function wasmNativeByDefault(m) {
  if (!globalThis.crossOriginIsolated || wasmNativeUnsupported(m, 'int8')) return false;
  try {
    return WebAssembly.validate(RELAXED_SIMD_PROBE);
  } catch {
    return false;
  }
}

// The prompt the page starts with: the manifest's generation.prompt, else one in the style of the model's tokenizer.
function defaultPrompt(m) {
  if (typeof m.generation?.prompt === 'string' && m.generation.prompt) return m.generation.prompt;
  if (m.tokenizer.kind === 'rwkv-world') return 'User: Tell me about the RWKV language model.\n\nAssistant:';
  if (m.tokenizer.kind === 'bytes') return 'def ';
  return 'The quick brown fox';
}

// On the GPU, int8 and int4 run fast in webgpu-native (onnxruntime-web's WebGPU EP runs int8's DynamicQuantizeMatMul
// on the CPU): the hint the page gives where a variant does not suit the chosen onnxruntime-web backend.
function nativeHint(m, variant, backend) {
  if (backend !== 'webgpu' || demo.webgpu?.available === false || nativeUnsupported(m, variant)) return '';
  return `; on the GPU, ${NATIVE} runs ${variant} (choose WebGPU native)`;
}

// Variant per backend: unless the user picked one, the variant list follows the backend (the smallest variant that
// suits it, from the manifest's "backends"); the note under the controls says which and why.
let variantChosen = false;
function followBackend() {
  const m = demo.manifest;
  const backend = $('backend').value;
  const features = { shaderF16: demo.webgpu?.shaderF16 === true };
  if (backend === WASM_NATIVE) {
    // rt_wasm.js runs the int8 variant (dynamic-int7) of RWKV-4 (its own check, rt_wasm.js unsupported(), decides)
    if (!variantChosen && !wasmNativeUnsupported(m, 'int8')) $('variant').value = 'int8';
    const v = $('variant').value;
    const why = wasmNativeUnsupported(m, v);
    $('variant-note').textContent = why ? `${why}.` : `${v} runs on ${WASM_NATIVE}: hand-written wasm SIMD kernels ` +
      '(rt_wasm.js), no onnxruntime, exact integer dot products.' +
      (autoBackend ? ' It is the default here (RWKV-4 int8, relaxed SIMD, cross-origin isolated); choose wasm for onnxruntime-web.' : '');
    demo.variantFit = !why;
    return;
  }
  if (backend === NATIVE) {
    // rt_webgpu.js runs fp32, fp16, int8 (dynamic-int7: onnxruntime's integers) and int4 (MatMulNBits) of RWKV-4: the
    // smallest of them unless the user picked (its own check, rt_webgpu.js unsupported(), decides: older manifests
    // do not list "webgpu-native")
    const runs = stepGraphs(m).filter((x) => !nativeUnsupported(m, x.variant));
    if (!variantChosen && runs.length) $('variant').value = runs.reduce((a, x) => (graphBytes(m, x) < graphBytes(m, a) ? x : a)).variant;
    const v = $('variant').value;
    const why = nativeUnsupported(m, v);
    const gpu = demo.webgpu?.available === false ? ` WebGPU is unavailable here (${demo.webgpu.why}): it will not load.` : '';
    $('variant-note').textContent = why ? `${why}.` : `${v} runs on ${NATIVE}${variantChosen ? '' : ' (the smallest variant here that it runs)'}: ` +
      `hand-written WGSL kernels (rt_webgpu.js), no onnxruntime, the state on the GPU.${gpu}`;
    demo.variantFit = !why;
    return;
  }
  if (!variantChosen) {
    const pick = pickVariant(m, backend, features);
    $('variant').value = pick.variant;
  }
  const g = stepGraph(m, $('variant').value);
  const fit = suits(g, backend, features);
  const others = stepGraphs(m).filter((x) => suits(x, backend, features)).map((x) => x.variant);
  $('variant-note').textContent = fit === null ? '' : fit
    ? `${g.variant} suits ${backend}${variantChosen ? '' : ' (the smallest variant here that does)'}.`
    : `${g.variant} does not suit ${backend} (the manifest lists it for ${g.backends.join(', ') || 'no web backend'})` +
      (others.length ? `; for ${backend}: ${others.join(', ')}` : '') + nativeHint(m, g.variant, backend) + '.';
  demo.variantFit = fit;
}

async function start() {
  setStatus('manifest');
  let m;
  try {
    m = await fetchManifest(modelBase);
  } catch (e) {
    $('model-summary').textContent = 'No model.';
    showError(`Could not read the model folder: ${e.message}`);
    return;
  }
  demo.manifest = m;
  $('model-summary').textContent = describeModel(m);
  try {
    demo.tokenizer = await loadTokenizerFor(m);
  } catch (e) {
    showError(`Could not load the tokenizer: ${e.message}`);
    return;
  }
  if (demo.tokenizer.vocabSize > m.model.vocab_size) {
    showError(`The tokenizer has ${demo.tokenizer.vocabSize} ids but the model's vocab is ${m.model.vocab_size}: wrong tokenizer for this model`);
    return;
  }
  const eos = demo.tokenizer.tokenToId('<|endoftext|>');
  eosId = eos === undefined ? null : eos;
  fillSetup(m);
  updatePromptCount();
  await probeWebGPUForLabel();
  followBackend();
  setStatus('setup');
  if (params.get('autoload') === '1') demo.load().catch(() => {});
}

// ---- loading ----------------------------------------------------------------------------------------------------

let phaseTimer = null;
function showPhase(text, { loaded = null, total = null } = {}) {
  $('progress').hidden = false;
  const bar = $('progress-bar');
  if (total) { bar.max = total; bar.value = loaded; } else { bar.removeAttribute('value'); } // indeterminate
  $('progress-text').textContent = text;
}

function startPhaseClock(label) {
  clearInterval(phaseTimer);
  const t0 = performance.now();
  showPhase(`${label}…`);
  phaseTimer = setInterval(() => showPhase(`${label}… ${((performance.now() - t0) / 1000).toFixed(1)} s`), 100);
}

function stopPhaseClock() {
  clearInterval(phaseTimer);
  phaseTimer = null;
}

function onProgress(p) {
  if (p.phase === 'download') {
    stopPhaseClock();
    const pct = p.total ? ` (${((100 * p.loaded) / p.total).toFixed(0)}%)` : '';
    const rate = p.seconds > 0.05 ? ` · ${(p.loaded / 1e6 / p.seconds).toFixed(0)} MB/s` : '';
    showPhase(`Downloading ${p.file}: ${formatBytes(p.loaded)} / ${formatBytes(p.total)}${pct}${rate}`, p);
    demo.progress = { loaded: p.loaded, total: p.total };
  } else if (p.phase === 'verify') startPhaseClock(`Checking ${p.file} against the manifest's sha256`);
  else if (p.phase === 'probe') startPhaseClock('Looking for a WebGPU adapter');
  else if (p.phase === 'runtime') startPhaseClock(`Loading onnxruntime-web (${p.backend})`);
  else if (p.phase === 'kernels') startPhaseClock('Uploading the weights and building the WGSL kernels (webgpu-native)');
  else if (p.phase === 'session') startPhaseClock(`Creating the inference session (${p.backend}, ${p.numThreads} thread${p.numThreads > 1 ? 's' : ''}): compiling and optimizing the graph`);
  else if (p.phase === 'warmup') {
    if (p.steps) {
      stopPhaseClock();
      showPhase(`Warming up (the browser compiles onnxruntime's hot code): step ${p.step} / ${p.steps}`, { loaded: p.step, total: p.steps });
    } else startPhaseClock('Warm-up step');
  }
}

// webgpu-native runs in the page (rt_webgpu.js's nativeWorker speaks worker.js's messages): its work is on the GPU.
function newWorker(backend) {
  if (worker) worker.terminate();
  worker = backend === NATIVE ? nativeWorker()
    : new Worker(new URL(backend === WASM_NATIVE ? './wasm_native_worker.js' : './worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = (e) => onWorkerMessage(e.data);
  worker.onerror = (e) => {
    e.preventDefault();
    failPending(`The model worker failed to start: ${e.message || 'worker.js or a module it imports could not be loaded'}`);
  };
}

function failPending(message) {
  stopPhaseClock();
  if (pendingLoad) {
    showError(`Could not load the model: ${message}`, 'load-failed');
    pendingLoad.reject(new Error(message));
    pendingLoad = null;
  } else if (pendingRun) {
    showError(message, 'ready');
    pendingRun.reject(new Error(message));
    pendingRun = null;
  } else showError(message);
}

const IO_TEXT = {
  capture: 'graph capture, state on the GPU', gpu: 'state on the GPU', cpu: 'state through the CPU',
  native: 'rt_webgpu.js: hand-written WGSL kernels, no onnxruntime, state on the GPU',
  'wasm-native': 'rt_wasm.js: hand-written wasm SIMD kernels, no onnxruntime',
};

const HINTS = {
  download: 'Check that the export folder is complete and served.',
  verify: 'Re-export the folder, or copy it again.',
  session: 'The model file may be damaged or not a valid ONNX model, or this onnxruntime-web version cannot run it.',
  runtime: '',
};

function onWorkerMessage(msg) {
  switch (msg.type) {
    case 'ready':
      break;
    case 'progress':
      onProgress(msg);
      break;
    case 'notice':
      notice(msg.message, msg.kind || 'info');
      break;
    case 'loaded': {
      stopPhaseClock();
      const i = msg.info;
      demo.loadInfo = i;
      const threads = ` (${i.numThreads} thread${i.numThreads > 1 ? 's' : ''}`;
      const how = i.backend === 'wasm' ? `${threads})` : i.backend === WASM_NATIVE ? `${threads}, ${IO_TEXT[i.io]}, kernel ${i.kernel})` : ` (${IO_TEXT[i.io]}` +
        (i.backend === NATIVE ? `; ${i.nodes.step.dispatches} dispatches a token${i.adapter ? ` on ${i.adapter}` : ''})` : ')');
      showPhase(`Ready: ${i.variant} on ${i.backend}${how}`,
        { loaded: 1, total: 1 });
      $('load-info').textContent = `Downloaded ${formatBytes(i.bytes)} in ${i.downloadSeconds.toFixed(1)} s · ` +
        (i.verifySeconds > 0 ? `sha256 ${i.verifySeconds.toFixed(1)} s · ` : '') + 'session ' +
        `${i.sessionSeconds.toFixed(1)} s · warm-up ${(i.warmupSeconds * 1000).toFixed(0)} ms` +
        (i.sequence ? ` · prompts run through ${i.sequence}` : ' · prompts run token by token');
      setStatus('ready');
      pendingLoad?.resolve(i);
      pendingLoad = null;
      break;
    }
    case 'prompt':
      if (pendingRun) {
        pendingRun.promptMs = msg.ms;
        $('stat-prompt').textContent = `${msg.tokens} tokens in ${fmtMs(msg.ms)} (${rate(msg.tokens, msg.ms)}, ${msg.mode === 'sequence' ? `prompt graph, ${msg.runs} call${msg.runs === 1 ? '' : 's'}` : 'token by token'})`;
      }
      break;
    case 'token': // one token (worker.js) or a batch (wasm_native_worker.js: 'tokens')
    case 'tokens':
      if (pendingRun) {
        for (const id of msg.ids ?? [msg.id]) {
          pendingRun.ids.push(id);
          pendingRun.text += safePush(pendingRun.decoder, id);
        }
        pendingRun.genMs = msg.ms;
        scheduleRender();
      }
      break;
    case 'done':
      if (pendingRun) finishRun(msg);
      break;
    case 'error': {
      const hint = HINTS[msg.phase] ? ` ${HINTS[msg.phase]}` : '';
      if (pendingLoad) failPending(`${msg.message}${hint}`);
      else if (pendingRun) failPending(`Generation failed: ${msg.message}`);
      else showError(msg.message, demo.status === 'error' ? 'error' : demo.status);
      break;
    }
    default:
      break;
  }
}

// Where the page chose wasm native (not the user, not a URL parameter, not opts.backend) and it fails to load, the
// model loads on onnxruntime-web's wasm instead, with a notice that says why.
demo.load = function load(opts = {}) {
  const auto = autoBackend && opts.backend == null && $('backend').value === WASM_NATIVE;
  const first = loadOnce(opts);
  if (!auto) return first;
  return first.catch((e) => {
    if (e.message === 'busy' || e.message === 'no manifest') throw e;
    autoBackend = false;
    $('backend').value = 'wasm';
    followBackend();
    const again = loadOnce({ ...opts, backend: 'wasm' });
    notice(`wasm native could not load (${e.message}): loaded on onnxruntime-web's wasm instead.`, 'warn');
    return again;
  });
};

function loadOnce(opts = {}) {
  if (!demo.manifest) return Promise.reject(new Error('no manifest'));
  if (pendingLoad || pendingRun) return Promise.reject(new Error('busy'));
  const variant = opts.variant ?? $('variant').value;
  const backend = opts.backend ?? $('backend').value;
  const numThreads = Number(opts.threads ?? $('threads').value);
  const verify = opts.verify ?? $('verify').checked;
  clearError();
  $('notices').replaceChildren();
  demo.notices = [];
  const g = stepGraph(demo.manifest, variant);
  if (backend !== NATIVE && backend !== WASM_NATIVE && suits(g, backend, { shaderF16: demo.webgpu?.shaderF16 === true }) === false) {
    notice(`${variant} does not suit ${backend} (the manifest lists it for ${g.backends.join(', ') || 'no web backend'}): expect it to be slow${nativeHint(demo.manifest, variant, backend)}.`, 'warn');
  }
  demo.loadInfo = null;
  $('load-info').textContent = '';
  setStatus('loading');
  newWorker(backend);
  return new Promise((resolve, reject) => {
    pendingLoad = { resolve, reject };
    worker.postMessage({
      type: 'load', manifest: demo.manifest, variant, backend, numThreads, verify, useSequence: opts.useSequence ?? params.get('sequence') !== '0',
      decodeBatch: opts.decodeBatch ?? (params.has('batch') ? Number(params.get('batch')) : undefined),
      profile: opts.profile ?? params.get('profile') === '1',
      io: opts.io ?? params.get('io') ?? 'auto', ortBuild: opts.ort ?? params.get('ort') ?? 'webgpu',
      warmupSteps: opts.warmupSteps ?? (params.has('warmup') ? Number(params.get('warmup')) : undefined),
      modelBase: modelBase.href, ortBase,
    });
  });
}

// ---- generation -------------------------------------------------------------------------------------------------

const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
const rate = (n, ms) => (ms > 0 ? `${((1000 * n) / ms).toFixed(1)} tok/s` : '– tok/s');

function safePush(decoder, id) {
  try {
    return decoder.push(id);
  } catch {
    return '\ufffd';
  }
}

// Streamed text is drawn at most every RENDER_INTERVAL_MS, and only the new text is appended: layout and paint run on
// the same two cores as the model, and redrawing the whole output on every frame cost ~10% of the tokens/s at 169M.
// Each drawn frame still costs ~3 ms of the page's main thread and ~3 ms of compositor, raster and display threads
// (2-core VM, 169M int8 on wasm-native, CPU time per thread from /proc): at 100 ms that was ~2 ms a token, taken from
// the cores the model's two threads need; 200 ms halves it.
const RENDER_INTERVAL_MS = 200;
let renderQueued = false;
let lastRender = 0;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  const wait = Math.max(0, RENDER_INTERVAL_MS - (performance.now() - lastRender));
  setTimeout(() => requestAnimationFrame(render), wait);
}

// Sets el's text to `text`, appending only what is new when `text` extends what el shows.
const shownText = new WeakMap();
function showText(el, text) {
  const shown = shownText.get(el);
  if (shown !== undefined && el.textContent === shown && text.startsWith(shown)) {
    if (text.length > shown.length) el.append(text.slice(shown.length));
  } else el.textContent = text;
  shownText.set(el, text);
}

function render() {
  renderQueued = false;
  lastRender = performance.now();
  const r = pendingRun ?? demo.lastResult;
  if (!r) return;
  // follow the stream unless the reader scrolled up
  const out = $('output');
  const atEnd = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
  showText($('out-gen'), r.text);
  if (atEnd) out.scrollTop = out.scrollHeight;
  const n = r.ids.length;
  const why = r.reason === 'stopped' ? ' (stopped)' : r.reason === 'eos' ? ' (end of text)' : '';
  $('stat-gen').textContent = `${n} token${n === 1 ? '' : 's'}${why}`;
  $('stat-speed').textContent = r.genMs ? rate(n, r.genMs) : '–';
  if ($('ids-details').open) $('ids').textContent = r.ids.join(' ');
}

const FORM_FIELDS = {
  temperature: 'temperature', topP: 'top_p', minPRatio: 'min_p_ratio', minPPower: 'min_p_power', maxTokens: 'max_tokens', seed: 'seed',
};

function readParams() {
  const num = (id) => Number($(id).value);
  const p = {
    temperature: num('temperature'), topP: num('top_p'), minPRatio: num('min_p_ratio'), minPPower: num('min_p_power'),
    maxTokens: num('max_tokens'), seed: num('seed'),
  };
  return p;
}

function checkAll(p) {
  checkParams(p);
  if (!Number.isInteger(p.maxTokens) || p.maxTokens < 0 || p.maxTokens > 1e6) throw new RangeError(`max tokens must be an integer in [0, 1000000], got ${p.maxTokens}`);
  if (!Number.isInteger(p.seed) || p.seed < 0 || p.seed > 0xffffffff) throw new RangeError(`seed must be an integer in [0, 4294967295], got ${p.seed}`);
}

demo.generate = function generate(opts = {}) {
  if (demo.status !== 'ready') return Promise.reject(new Error(`not ready (status: ${demo.status})`));
  const prompt = opts.prompt ?? $('prompt').value;
  const p = { ...readParams(), ...opts };
  delete p.prompt;
  $('param-error').textContent = '';
  try {
    checkAll(p);
  } catch (e) {
    $('param-error').textContent = e.message;
    return Promise.reject(e);
  }
  const promptIds = demo.tokenizer.encode(prompt);
  if (promptIds.length === 0) {
    const e = new Error('the prompt is empty (it encodes to no tokens)');
    $('param-error').textContent = e.message;
    return Promise.reject(e);
  }
  clearError();
  // Show what runs: options given to the API are written into the form.
  if (opts.prompt != null) $('prompt').value = prompt;
  for (const [key, id] of Object.entries(FORM_FIELDS)) if (opts[key] != null) $(id).value = String(opts[key]);
  updatePromptCount();
  $('out-prompt').textContent = prompt;
  $('out-gen').textContent = '';
  $('ids').textContent = '';
  $('stat-prompt').textContent = `${promptIds.length} tokens…`;
  $('stat-gen').textContent = '0 tokens';
  $('stat-speed').textContent = '–';
  setStatus('generating');
  return new Promise((resolve, reject) => {
    pendingRun = {
      resolve, reject, prompt, promptIds, params: p, ids: [], text: '', genMs: 0, promptMs: 0,
      decoder: demo.tokenizer.decoder(),
    };
    worker.postMessage({
      type: 'generate', promptIds, eosId,
      params: { temperature: p.temperature, topP: p.topP, minPRatio: p.minPRatio, minPPower: p.minPPower, maxTokens: p.maxTokens, seed: p.seed },
    });
  });
};

function finishRun(msg) {
  const r = pendingRun;
  pendingRun = null;
  r.text += r.decoder.flush();
  r.genMs = msg.generateMs;
  const result = {
    prompt: r.prompt, promptIds: r.promptIds, ids: msg.ids, text: r.text, reason: msg.reason, params: r.params,
    stats: {
      promptTokens: msg.promptTokens, promptMs: msg.promptMs, promptMode: msg.promptMode, promptRuns: msg.promptRuns,
      generatedTokens: msg.generatedTokens, generateMs: msg.generateMs, modelMs: msg.modelMs,
      tokensPerSecond: msg.generateMs > 0 ? (1000 * msg.generatedTokens) / msg.generateMs : null,
    },
  };
  demo.lastResult = { ...result, genMs: r.genMs };
  render();
  $('ids').textContent = msg.ids.join(' ');
  document.body.dataset.generated = JSON.stringify(msg.ids);
  setStatus('ready');
  r.resolve(result);
}

demo.stop = function stop() {
  if (worker && demo.status === 'generating') worker.postMessage({ type: 'stop' });
};
// Ids received so far in the current run (or the last one).
demo.currentIds = () => (pendingRun ?? demo.lastResult)?.ids.slice() ?? [];
demo.encode = (text) => demo.tokenizer.encode(text);
demo.decode = (ids) => demo.tokenizer.decode(ids);

// ---- controls ---------------------------------------------------------------------------------------------------

let countTimer = null;
function updatePromptCount() {
  if (!demo.tokenizer) return;
  const n = demo.tokenizer.encode($('prompt').value).length;
  $('prompt-count').textContent = `${n} prompt token${n === 1 ? '' : 's'}`;
}

$('prompt').addEventListener('input', () => {
  clearTimeout(countTimer);
  countTimer = setTimeout(updatePromptCount, 150);
});
$('load').addEventListener('click', () => demo.load().catch(() => {}));
$('backend').addEventListener('change', () => { autoBackend = false; followBackend(); });
$('variant').addEventListener('change', () => { variantChosen = true; followBackend(); });
$('generate').addEventListener('click', () => demo.generate().catch(() => {}));
$('stop').addEventListener('click', () => demo.stop());
$('ids-details').addEventListener('toggle', () => {
  const r = pendingRun ?? demo.lastResult;
  if ($('ids-details').open && r) $('ids').textContent = r.ids.join(' ');
});

start().catch((e) => showError(`The demo could not start: ${e.message}`));
