// runtimes.html: one export folder in three runtimes (onnxruntime-web, TF.js, tfjs-tflite) on their backends, with the
// same manifest reading (manifest.js), tokenizer (tokenizer.js) and sampling (sampling.js) as the demo. The runtime
// runs on the page's thread or, with worker, in a Web Worker (rt_worker.js), one model at a time; the page times load,
// prompt and decode.
//
// URL: runtime=ort|tfjs|tflite|wasm-native, backend=wasm|webgpu (ort) / wasm|webgl|webgpu|cpu (tfjs) / wasm (tflite) /
// wasm-native (wasm-native: our own wasm SIMD runtime, rt_wasm.js, int8 RWKV-4 only),
// variant=NAME, model=URL/ (the export folder, default /model/), threads=N, worker=1, prompt=TEXT, tokens=N, verify=0,
// promptgraph=0 (feed the prompt token by token even where the folder has a prompt graph), autorun=1.
// window.rwkvRuntimes: load({runtime, backend, variant, threads, worker, promptGraph}), generate({prompt|promptIds, maxTokens,
// temperature, seed}), memory(), manifest, info, lastResult, status (also document.body.dataset.status), error.

import { FORMAT_TITLES, fetchManifest, formatBytes, graphFiles, sequenceGraph, stepGraph, variants } from './manifest.js';
import { errorText, openInWorker } from './rt_common.js';
import { argmax, checkParams, makeRng, sampleToken } from './sampling.js';
import { loadTokenizer } from './tokenizer.js';

export const RUNTIMES = {
  ort: { title: 'onnxruntime-web', format: 'onnx', module: './rt_ort.js', backends: ['wasm', 'webgpu'] },
  native: { title: 'WebGPU native', format: 'onnx', module: './rt_webgpu.js', backends: ['webgpu-native'] },
  'wasm-native': { title: 'wasm native', format: 'onnx', module: './rt_wasm.js', backends: ['wasm-native'] }, // int8 only
  tfjs: { title: 'TF.js', format: 'tfjs', module: './rt_tfjs.js', backends: ['wasm', 'webgl', 'webgpu', 'cpu'] },
  tflite: { title: 'tfjs-tflite', format: 'tflite', module: './rt_tflite.js', backends: ['wasm'] },
};
const EXPORT_COMMAND = { onnx: 'rwkv-export onnx', tfjs: 'rwkv-export tfjs', tflite: 'rwkv-export tflite' };

const params = new URLSearchParams(location.search);
const modelBase = new URL(params.get('model') || '/model/', location.href).href;
const $ = (id) => document.getElementById(id);
const api = { status: 'manifest', manifest: null, info: null, lastResult: null, error: null, runner: null };
window.rwkvRuntimes = api;

function setStatus(s) {
  api.status = s;
  document.body.dataset.status = s;
}

function showError(msg) {
  api.error = msg;
  $('error').hidden = false;
  $('error').textContent = msg;
}

const formatsIn = (m) => Object.keys(RUNTIMES).filter((r) => variants(m, RUNTIMES[r].format).length);

function fillSelect(sel, values, chosen) {
  sel.replaceChildren(...values.map((v) => new Option(v, v)));
  if (values.includes(chosen)) sel.value = chosen;
}

function fillControls() {
  const rt = RUNTIMES[$('runtime').value];
  fillSelect($('backend'), rt.backends, params.get('backend') ?? $('backend').value);
  const vs = variants(api.manifest, rt.format);
  fillSelect($('variant'), vs, params.get('variant') ?? $('variant').value);
  const note = vs.length ? '' : `This folder has no ${FORMAT_TITLES[rt.format]} step graph: make one with ` +
    `\`${EXPORT_COMMAND[rt.format]} CHECKPOINT -o FOLDER\`.`;
  $('runtime-note').textContent = note;
  $('load').disabled = !vs.length;
}

// The bytes of the graphs' files, each file once (an ONNX step and prompt graph share their weights file).
const downloadBytes = (m, graphs) => [...new Map(graphs.flatMap((g) => graphFiles(m, g)).map((f) => [f.file, f.size ?? 0])).values()]
  .reduce((a, b) => a + b, 0);

// Load a runtime/backend/variant: the model's files are fetched again (each runtime holds its own copy).
api.load = async ({ runtime, backend, variant, threads = 1, worker = false, verify = true, promptGraph = true } = {}) => {
  const rt = RUNTIMES[runtime];
  if (!rt) throw new Error(`unknown runtime '${runtime}' (${Object.keys(RUNTIMES).join(', ')})`);
  setStatus('loading');
  $('error').hidden = true;
  api.error = null;
  if (api.runner) await api.runner.dispose();
  api.runner = null;
  api.info = null;
  const m = api.manifest;
  const t0 = performance.now();
  try {
    const graph = stepGraph(m, variant, rt.format);
    const seq = sequenceGraph(m, variant, rt.format);
    const options = { manifest: m, modelBase, graph, seq, backend, threads, verify };
    const runner = worker ? await openInWorker(rt.module, options) : await (await import(rt.module)).open(options);
    if (!promptGraph && runner.prompt) { // asked for: e.g. to tell a prompt graph's failure from the step graph's
      runner.prompt = null;
      runner.promptInfo = null;
      runner.notes = [...runner.notes, 'the prompt graph is not used (promptgraph=0): the prompt runs token by token'];
    }
    const loadMs = performance.now() - t0;
    await runner.step(0); // the first run builds kernels / shaders: timed apart, not part of decode speed
    await runner.reset();
    api.runner = runner;
    api.info = {
      runtime, title: rt.title, backend: runner.backend, variant, threads: runner.threads, file: graph.file,
      bytes: runner.bytes, downloadBytes: downloadBytes(m, seq && runner.promptInfo?.graph === seq.file ? [graph, seq] : [graph]),
      worker, loadSeconds: loadMs / 1000,
      firstRunSeconds: (performance.now() - t0 - loadMs) / 1000, notes: runner.notes,
      prompt: runner.promptInfo ? `prompt graph ${runner.promptInfo.graph}` : 'prompt via steps',
      crossOriginIsolated: self.crossOriginIsolated === true,
    };
    $('load-info').textContent = `${rt.title} ${runner.backend}${runner.threads ? ` (${runner.threads} threads)` : ''}, ` +
      `${variant}: ${formatBytes(runner.bytes)} in ${api.info.loadSeconds.toFixed(2)} s, first run ` +
      `${api.info.firstRunSeconds.toFixed(2)} s; ${api.info.prompt}. ${runner.notes.join(' ')}`;
    setStatus('ready');
    $('generate').disabled = false;
    return api.info;
  } catch (e) {
    const msg = `${rt.title} (${backend}, ${variant}) cannot run this model: ${errorText(e)}`;
    showError(msg);
    setStatus('load-failed');
    return { error: msg, limit: e.name === 'RuntimeLimit', fix: e.fix ?? null };
  }
};

// Prompt then maxTokens tokens; greedy at temperature 0. {promptIds, ids, text, stats}
api.generate = async ({ prompt, promptIds, maxTokens = 64, temperature = 0, topP = 0.85, minPRatio = 0.02, minPPower = 2, seed = 0 } = {}) => {
  const r = api.runner;
  if (!r) throw new Error('no model loaded');
  const sampling = { temperature, topP, minPRatio, minPPower };
  checkParams(sampling);
  const ids0 = promptIds ?? api.tokenizer.encode(prompt);
  if (!ids0.length) throw new Error('the prompt is empty');
  setStatus('generating');
  const rng = makeRng(seed);
  await r.reset();
  const t0 = performance.now();
  let logits;
  let promptRuns = 0;
  let i = 0;
  const chunk = r.promptInfo?.chunk ?? ids0.length;
  if (r.prompt && ids0.length > 1) {
    for (; i + (r.promptInfo.fixed ? chunk : 1) <= ids0.length; i += chunk, promptRuns++) {
      logits = await r.prompt(ids0.slice(i, i + chunk));
    }
  }
  for (; i < ids0.length; i++, promptRuns++) logits = await r.step(ids0[i]);
  const t1 = performance.now();
  const ids = [];
  for (let n = 0; n < maxTokens; n++) {
    const id = temperature === 0 ? argmax(logits) : sampleToken(logits, sampling, rng);
    ids.push(id);
    logits = await r.step(id);
  }
  const t2 = performance.now();
  const stats = {
    promptTokens: ids0.length, promptMs: t1 - t0, promptRuns, promptMode: r.prompt ? 'sequence' : 'step',
    generatedTokens: ids.length, generateMs: t2 - t1,
    promptTokensPerSecond: ids0.length / ((t1 - t0) / 1000), tokensPerSecond: ids.length / ((t2 - t1) / 1000),
  };
  api.lastResult = { promptIds: ids0, ids, text: api.tokenizer.decode(ids), stats, lastLogits: Array.from(logits) };
  $('output').textContent = api.lastResult.text;
  $('stats').textContent = `prompt ${ids0.length} tokens in ${stats.promptMs.toFixed(0)} ms (${stats.promptMode}); ` +
    `${ids.length} tokens at ${stats.tokensPerSecond.toFixed(1)} tok/s`;
  $('ids').textContent = ids.join(' ');
  setStatus('ready');
  return api.lastResult;
};

// Memory now: the page's (performance.measureUserAgentSpecificMemory: JS heap, ArrayBuffers and wasm memories of this
// page and its workers; needs cross-origin isolation; Chromium answers at its next GC unless started with
// --enable-blink-features=ForceEagerMeasureMemory), the JS heap (performance.memory) and the runtime's wasm memory.
api.memory = async ({ timeoutMs = 30000 } = {}) => {
  let ua = null;
  let uaError = self.crossOriginIsolated ? null : 'not cross-origin isolated';
  if (!uaError && performance.measureUserAgentSpecificMemory) {
    ua = await Promise.race([performance.measureUserAgentSpecificMemory().then((x) => x.bytes).catch((e) => { uaError = errorText(e); return null; }),
      new Promise((res) => setTimeout(() => { uaError = `no answer in ${timeoutMs} ms`; res(null); }, timeoutMs))]);
  }
  return { uaBytes: ua, uaError, jsHeapBytes: performance.memory?.usedJSHeapSize ?? null, wasmBytes: api.runner?.wasmBytes() ?? null };
};

function controlsOptions() {
  return {
    runtime: $('runtime').value, backend: $('backend').value, variant: $('variant').value,
    threads: Number($('threads').value), worker: $('worker').checked, verify: params.get('verify') !== '0',
    promptGraph: params.get('promptgraph') !== '0',
  };
}

// fetchManifest checks the step graphs of one format: the folder's own (an onnx, tfjs or tflite export, or several)
async function openManifest() {
  let first = null;
  for (const r of Object.values(RUNTIMES)) {
    try {
      return await fetchManifest(modelBase, { format: r.format });
    } catch (e) {
      if (!/lists no .* step graph/.test(e.message)) throw e;
      first ??= e;
    }
  }
  throw first;
}

async function start() {
  try {
    api.manifest = await openManifest();
    const t = api.manifest.tokenizer;
    api.tokenizer = await loadTokenizer(t.file != null ? { ...t, url: new URL(t.file, modelBase).href } : t);
  } catch (e) {
    showError(`Cannot open the model folder: ${errorText(e)}`);
    setStatus('error');
    return;
  }
  const m = api.manifest;
  const have = formatsIn(m);
  $('model-summary').textContent = `RWKV-${m.model.rwkv_version}, ${m.model.n_layer} layers × ${m.model.n_embd}, ` +
    `vocab ${m.model.vocab_size}; graphs here: ${have.map((r) => `${FORMAT_TITLES[RUNTIMES[r].format]} (${variants(m, RUNTIMES[r].format).join(', ')})`).join('; ')}`;
  fillSelect($('runtime'), Object.keys(RUNTIMES), params.get('runtime') ?? have[0]);
  const cores = Math.min(navigator.hardwareConcurrency || 1, 8);
  fillSelect($('threads'), Array.from({ length: cores }, (_, i) => String(i + 1)), params.get('threads') ?? String(Math.min(cores, 4)));
  $('worker').checked = params.get('worker') === '1';
  if (!self.crossOriginIsolated) $('env-note').textContent = 'Not cross-origin isolated: wasm runs single-threaded (serve with `rwkv-export serve`).';
  fillControls();
  $('runtime').onchange = fillControls;
  $('prompt').value = params.get('prompt') ?? (m.tokenizer.kind === 'bytes' ? 'def ' : 'The RWKV language model');
  $('tokens').value = params.get('tokens') ?? '64';
  $('load').onclick = () => api.load(controlsOptions());
  $('generate').onclick = () => api.generate({ prompt: $('prompt').value, maxTokens: Number($('tokens').value) })
    .catch((e) => { showError(errorText(e)); setStatus('ready'); });
  setStatus('setup');
  if (params.get('autorun') === '1') {
    const info = await api.load(controlsOptions());
    if (!info.error) await $('generate').onclick();
  }
}

start();
