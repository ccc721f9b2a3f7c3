// Module worker: downloads the model, runs onnxruntime-web, samples tokens. The page stays responsive because
// all of this happens here. It deals in token ids only; the page owns the tokenizer.
//
// Messages in:  {type:'load', modelBase, manifest, variant, backend:'wasm'|'webgpu', numThreads, ortBase, verify,
//                useSequence, warmupSteps}
//               {type:'generate', promptIds, params:{temperature, topP, minPRatio, minPPower, maxTokens, seed}, eosId}
//               {type:'stop'}
// Messages out: {type:'progress', phase, ...}, {type:'notice', message}, {type:'loaded', info},
//               {type:'prompt', tokens, ms}, {type:'token', id, n, ms}, {type:'done', ...}, {type:'error', phase, message}

import { PROGRESS_INTERVAL_MS, PhaseError, errorText, fetchGraphFiles, yieldToEvents } from './fetch_files.js';
import { ioByRole, sequenceGraph, stepGraph } from './manifest.js';
import { checkParams, decode, makeRng } from './sampling.js';
import {
  CpuState, GpuState, GraphRunner, attempts, nodePlacement, pinBuffers, sessionOptions,
} from './session_io.js';

const ADAPTER_TIMEOUT_MS = 5000; // requestAdapter() may never settle on some drivers
// JIT warm-up after load. V8 first runs onnxruntime's wasm with its baseline compiler (Liftoff) and compiles the hot
// functions with TurboFan in the background once they have run enough; on a busy 2-core machine that compile competes
// with the model for the cores. Measured at 169M int8, 2 threads, 32-token generations right after load:
// 38, 25, 37, 40, 45, 46 tok/s (Chromium started with --no-liftoff: 45-47 from the first one, after a 15 s load).
// The dip came from the prompt graph's kernels (first used by the first prompt) compiling during the second run.
// So while loading the page runs the prompt graph on a 16-token chunk 4 times and then this many steps (~2 s at
// 169M): 42, 45, 44, 41, 41, 38 tok/s in a minute like the first. URL: warmup=N (0: no JIT warm-up).
const DEFAULT_WARMUP_STEPS = 32;
// ... and at most this long: a slow variant (int4 runs ~4 tok/s in wasm) would otherwise add many seconds to loading.
const WARMUP_MAX_MS = 3000;

// Measured on the GPU machine (README): RWKV-4 430M fp32 (1.72 GB of weights) fails to open on wasm and WebGPU alike
// ("Failed to load external data file"), 169M fp32 (0.68 GB) and 430M int8 (0.43 GB) open.
const WASM_WEIGHTS_LIMIT = 1.2e9;

let ort = null;
let model = null; // { manifest, step: {session, io, graph}, seq: {...}|null, backend }
let stopRequested = false;
let busy = false;

const post = (msg) => self.postMessage(msg);


async function probeWebGPU() {
  if (!self.navigator?.gpu) return { ok: false, why: 'this browser has no WebGPU (navigator.gpu is missing)' };
  try {
    const adapter = await Promise.race([
      navigator.gpu.requestAdapter(),
      new Promise((resolve) => setTimeout(() => resolve('timeout'), ADAPTER_TIMEOUT_MS)),
    ]);
    if (adapter === 'timeout') return { ok: false, why: 'requestAdapter() did not answer' };
    if (!adapter) return { ok: false, why: 'navigator.gpu.requestAdapter() found no GPU adapter' };
    return { ok: true };
  } catch (e) {
    return { ok: false, why: `requestAdapter() failed: ${errorText(e)}` };
  }
}

// onnxruntime-web's WebGPU builds (URL ort=): 'webgpu' its native WebGPU EP over asyncify (the default), 'jspi' the
// same EP over JS promise integration, 'jsep' the older EP with JS kernels (ort.all).
const ORT_BUILDS = { webgpu: 'ort.webgpu.min.mjs', jspi: 'ort.jspi.min.mjs', jsep: 'ort.all.min.mjs' };

async function importOrt(ortBase, backend, numThreads, build = 'webgpu') {
  // The wasm-only build loads the smaller plain wasm binary; the WebGPU build also runs the wasm EP.
  if (!ORT_BUILDS[build]) throw new PhaseError('runtime', `unknown onnxruntime-web build '${build}' (${Object.keys(ORT_BUILDS).join(', ')})`);
  const file = backend === 'webgpu' ? ORT_BUILDS[build] : 'ort.wasm.min.mjs';
  try {
    ort = await import(new URL(file, ortBase).href);
  } catch (e) {
    throw new PhaseError('runtime', `cannot load onnxruntime-web from ${ortBase}${file}: ${errorText(e)} ` +
      '(run `npm ci --prefix web_demo`)');
  }
  ort.env.logLevel = 'error';
  ort.env.wasm.wasmPaths = ortBase; // absolute: a relative path would resolve against the ORT module, not the page
  ort.env.wasm.numThreads = numThreads;
  ort.env.wasm.proxy = false; // already off the main thread
}

// onnxruntime's own log (the wasm module binds console.log/error when it loads): worker.js forwards it unchanged,
// except while a session is created on WebGPU, when it is collected to find the nodes placed off the GPU.
let ortLog = null;
for (const k of ['log', 'info', 'warn', 'error']) {
  const orig = console[k].bind(console);
  console[k] = (...args) => (ortLog ? ortLog.push(args.join(' ')) : orig(...args));
}

async function createSession(bytes, graph, files, backend, extra = {}) {
  const opts = { executionProviders: [backend], graphOptimizationLevel: 'all', ...extra };
  const data = graph.data_files || [];
  if (data.length) {
    // External data paths are relative to the .onnx file's folder.
    const dir = graph.file.includes('/') ? graph.file.slice(0, graph.file.lastIndexOf('/') + 1) : '';
    opts.externalData = data.map((f) => ({ path: f.startsWith(dir) ? f.slice(dir.length) : f, data: files.get(f) }));
  }
  if (backend !== 'webgpu') return { session: await ort.InferenceSession.create(bytes, opts), offGpu: [], nodes: null };
  ortLog = [];
  try {
    const session = await ort.InferenceSession.create(bytes, { ...opts, logSeverityLevel: 0 });
    const { counts, offGpu } = nodePlacement(ortLog);
    return { session, offGpu, nodes: counts };
  } finally {
    ortLog = null;
  }
}

async function releaseModel() {
  const m = model;
  model = null;
  for (const part of [m?.step, m?.seq]) {
    if (part) await part.session.release().catch(() => {});
  }
  for (const r of [m?.runners?.step, m?.runners?.seq]) r?.destroy();
  m?.state?.destroy?.();
}

const MODE_TEXT = {
  capture: 'WebGPU with graph capture (state on the GPU)',
  gpu: 'WebGPU, state on the GPU (no graph capture)',
  cpu: 'the state through the CPU at every step',
};

async function load(msg) {
  const { manifest, variant, modelBase, ortBase, numThreads, verify } = msg;
  const t0 = performance.now();
  let backend = msg.backend;
  if (backend === 'webgpu') {
    post({ type: 'progress', phase: 'probe' });
    const probe = await probeWebGPU();
    if (!probe.ok) {
      post({ type: 'notice', kind: 'fallback', message: `WebGPU is not available (${probe.why}); using wasm instead.` });
      backend = 'wasm';
    }
  }
  const tries = attempts(backend, msg.io || 'auto');
  const step = stepGraph(manifest, variant);
  const seq = msg.useSequence ? sequenceGraph(manifest, variant) : null;
  const graphs = seq ? [step, seq] : [step];
  const stepIo = ioByRole(step, manifest);
  const seqIo = seq ? ioByRole(seq, manifest) : null;
  const logitsShape = stepIo.logits.shape;
  const vocab = typeof logitsShape[logitsShape.length - 1] === 'number' ? logitsShape[logitsShape.length - 1] : manifest.model.vocab_size;

  post({ type: 'progress', phase: 'runtime', backend, numThreads });
  await importOrt(ortBase, backend, numThreads, msg.ortBuild || 'webgpu');

  const dl = await fetchGraphFiles(manifest, modelBase, graphs, verify, post);

  // One attempt: sessions, state, runners, and one run of each graph from the fresh state (a WebGPU session can open
  // and still fail on its first run: an adapter's limits, e.g. storage buffers per shader stage, are only checked when
  // a kernel is first built; graph capture is set up on the first runs too).
  const open = async ({ backend: be, mode }) => {
    post({ type: 'progress', phase: 'session', backend: be, numThreads, mode });
    const t = performance.now();
    const parts = {};
    try {
      const s = await createSession(dl.files.get(step.file), step, dl.files, be, sessionOptions(mode, stepIo));
      parts.step = { session: s.session, io: stepIo, graph: step, offGpu: s.offGpu, nodes: s.nodes };
      if (seq) {
        const q = await createSession(dl.files.get(seq.file), seq, dl.files, be, sessionOptions(mode === 'capture' ? 'gpu' : mode, seqIo));
        parts.seq = { session: q.session, io: seqIo, graph: seq, offGpu: q.offGpu, nodes: q.nodes };
      }
    } catch (e) {
      for (const p of Object.values(parts)) await p.session.release().catch(() => {});
      // onnxruntime-web copies the weights into its 32-bit wasm memory (4 GB at most, the model's bytes included)
      const big = dl.bytes > WASM_WEIGHTS_LIMIT ? ` The weights (${(dl.bytes / 1e9).toFixed(2)} GB) are probably too large: ` +
        'onnxruntime-web copies them into its wasm memory (4 GB at most) on every backend; use a smaller variant (int8, int4).' : '';
      throw new PhaseError('session', `onnxruntime-web could not open ${step.file}: ${errorText(e)}${big}`);
    }
    const sessionSeconds = (performance.now() - t) / 1000;
    let state = null;
    let runners;
    try {
      const device = mode === 'cpu' ? null : ort.env.webgpu.device;
      state = device ? new GpuState(ort, device, manifest, stepIo, { fixed: mode === 'capture' }) : new CpuState(ort, manifest, stepIo);
      runners = {
        step: new GraphRunner(ort, parts.step, state, vocab, { capture: mode === 'capture', device }),
        seq: parts.seq ? new GraphRunner(ort, parts.seq, state, vocab, { device }) : null,
      };
    } catch (e) {
      for (const p of Object.values(parts)) await p.session.release().catch(() => {});
      state?.destroy?.();
      throw new PhaseError('session', `cannot set up ${MODE_TEXT[mode] ?? mode}: ${errorText(e)}`);
    }
    model = { manifest, backend: be, mode, numThreads, vocab, step: parts.step, seq: parts.seq ?? null, state, runners };
    post({ type: 'progress', phase: 'warmup' });
    const tWarm = performance.now();
    for (const [name, r] of Object.entries(runners)) {
      if (!r) continue;
      try {
        if (name === 'step' && mode === 'capture') await pinBuffers(ort, r.boundBuffers());
        state.reset();
        // a captured graph records on its first runs: run it twice so generation starts on the replay
        for (let i = 0; i < (name === 'step' && mode === 'capture' ? 2 : 1); i++) await r.run([0]);
      } catch (e) {
        await releaseModel();
        throw new PhaseError('session', `the first run of ${r.part.graph.file} failed: ${errorText(e)}`);
      }
    }
    return { sessionSeconds, warmupSeconds: (performance.now() - tWarm) / 1000 };
  };

  let opened = null;
  let sessionSeconds = 0;
  for (const [i, a] of tries.entries()) {
    try {
      opened = await open(a);
      sessionSeconds += opened.sessionSeconds;
      break;
    } catch (e) {
      if (i === tries.length - 1) throw e;
      const next = tries[i + 1];
      const what = a.backend === 'webgpu' ? MODE_TEXT[a.mode] : a.backend;
      post({
        type: 'notice', kind: 'fallback',
        message: `${what} failed: ${errorText(e).split('\n')[0]}; using ${next.backend === 'webgpu' ? MODE_TEXT[next.mode] : 'wasm'} instead.`,
      });
    }
  }
  dl.files.clear(); // the sessions hold their own copies
  // No silent fallback: nodes that onnxruntime placed off the GPU are named on the page (per graph).
  for (const part of [model.step, model.seq]) {
    if (!part?.offGpu.length) continue;
    const ops = [...new Set(part.offGpu.map((n) => n.op))];
    const why = part === model.seq ? ' (a prompt graph\'s shape arithmetic over its dynamic length runs there by design)' : '';
    post({
      type: 'notice', kind: 'warn',
      message: `${part.offGpu.length} node${part.offGpu.length === 1 ? '' : 's'} of ${part.graph.file} run on the CPU, not on WebGPU ` +
        `(${ops.join(', ')})${why}.`,
    });
  }
  const offGpu = [...model.step.offGpu, ...(model.seq?.offGpu ?? [])];
  const warmupSteps = model.backend === 'wasm' ? await jitWarmup(msg) : 0;
  post({
    type: 'loaded',
    info: {
      variant, backend: model.backend, io: model.mode, ortBuild: msg.ortBuild || 'webgpu', numThreads, file: step.file, sequence: seq ? seq.file : null,
      bytes: dl.bytes, downloadSeconds: dl.seconds, verifySeconds: dl.verifySeconds, sessionSeconds,
      warmupSeconds: opened.warmupSeconds, warmupSteps, totalSeconds: (performance.now() - t0) / 1000,
      crossOriginIsolated: self.crossOriginIsolated === true,
      offGpu: offGpu.map((n) => `${n.op} (${n.name})`), stateBytesOnGpu: model.state.bytes ?? 0,
      nodes: { step: model.step.nodes, prompt: model.seq?.nodes ?? null },
    },
  });
}

// More steps for the JIT (DEFAULT_WARMUP_STEPS) after loading on wasm, with progress; the state runs on from step to
// step like in decoding.
async function jitWarmup(msg) {
  const steps = Number.isInteger(msg.warmupSteps) && msg.warmupSteps >= 0 ? msg.warmupSteps : DEFAULT_WARMUP_STEPS;
  const tStart = performance.now();
  const late = () => performance.now() - tStart > WARMUP_MAX_MS;
  const { runners, state } = model;
  let last = 0;
  if (runners.seq && steps > 0) {
    // the prompt graph's kernels (matrix-matrix products) are other functions than a step's: make them hot too
    const chunk = Math.min(16, Number.isInteger(model.seq.graph.max_chunk) ? model.seq.graph.max_chunk : 16);
    const ids = Array.from({ length: chunk }, (_, i) => i % 2);
    for (let i = 0; i < 4 && !late(); i++) {
      state.reset();
      await runners.seq.run(ids);
    }
  }
  state.reset();
  let done = 0;
  while (done < steps && !late()) {
    await runners.step.run([done % 2]);
    done++;
    const now = performance.now();
    if (now - last > PROGRESS_INTERVAL_MS || done === steps) {
      post({ type: 'progress', phase: 'warmup', step: done, steps });
      last = now;
    }
  }
  return done;
}

async function generate({ promptIds, params, eosId }) {
  if (!model) throw new PhaseError('generate', 'no model loaded');
  checkParams(params);
  if (!promptIds.length) throw new PhaseError('generate', 'the prompt is empty (it encodes to no tokens)');
  const bad = promptIds.find((id) => !(Number.isInteger(id) && id >= 0 && id < model.vocab));
  if (bad !== undefined) throw new PhaseError('generate', `prompt token id ${bad} is outside the model's vocab [0, ${model.vocab})`);
  const rng = makeRng(params.seed);
  stopRequested = false;
  const { runners, state } = model;
  state.reset();
  let logits;
  const t0 = performance.now();
  let promptMode = 'step';
  let promptRuns = 0;
  // On the GPU only the last run's logits are read back (the others are not needed).
  if (runners.seq && promptIds.length > 1) {
    // A sequence graph takes at most max_chunk tokens per call (manifest); longer prompts go in chunks.
    const chunk = Number.isInteger(model.seq.graph.max_chunk) && model.seq.graph.max_chunk > 0 ? model.seq.graph.max_chunk : promptIds.length;
    for (let i = 0; i < promptIds.length; i += chunk) {
      logits = await runners.seq.run(promptIds.slice(i, i + chunk), i + chunk >= promptIds.length);
      promptRuns++;
      await yieldToEvents();
      if (stopRequested) break;
    }
    promptMode = 'sequence';
  } else {
    for (const [i, id] of promptIds.entries()) {
      logits = await runners.step.run([id], i === promptIds.length - 1);
      promptRuns++;
      await yieldToEvents();
      if (stopRequested) break;
    }
  }
  const t1 = performance.now();
  post({ type: 'prompt', tokens: promptIds.length, ms: t1 - t0, mode: promptMode, runs: promptRuns });
  const { ids, reason, modelMs } = await decode({
    logits, step: (id) => runners.step.run([id]), params, eosId, rng, post,
    stopped: () => stopRequested, pause: yieldToEvents, t1,
  });
  const t2 = performance.now();
  post({
    type: 'done', ids, reason, promptTokens: promptIds.length, promptMs: t1 - t0, promptMode, promptRuns,
    generatedTokens: ids.length, generateMs: t2 - t1, modelMs,
  });
}

self.onmessage = async (event) => {
  const msg = event.data;
  if (msg.type === 'stop') { stopRequested = true; return; }
  if (busy) { post({ type: 'error', phase: msg.type, fatal: false, message: 'busy: wait for the current run to finish' }); return; }
  busy = true;
  try {
    if (msg.type === 'load') await load(msg);
    else if (msg.type === 'generate') await generate(msg);
    else throw new PhaseError('worker', `unknown message type ${msg.type}`);
  } catch (e) {
    post({ type: 'error', phase: e.phase ?? msg.type, fatal: msg.type === 'load', message: errorText(e) });
  } finally {
    busy = false;
  }
};

post({ type: 'ready' });
