// The demo's (index.html) model worker for backend wasm-native: worker.js's message protocol over rt_wasm.js (our
// own wasm SIMD runtime for the RWKV-4 int8 step) instead of onnxruntime-web. A module worker, so the runner's thread
// (which spins while a matvec's helper threads finish) is not the page's; the helpers are its own workers.
//
// In:  {type:'load', modelBase, manifest, variant, numThreads, verify}, {type:'generate', promptIds, params, eosId},
//      {type:'stop'}
// Out: {type:'progress', phase, ...}, {type:'loaded', info}, {type:'prompt', tokens, ms, mode, runs},
//      {type:'tokens', ids, n, ms} (the tokens since the last such message: n the count so far, ms at the last one),
//      {type:'done', ...}, {type:'error', phase, message}; {type:'ready'} once at start.

import { errorText, fetchGraphFiles, yieldToEvents } from './fetch_files.js';
import { stepGraph } from './manifest.js';
import { BACKEND, RwkvWasm, unsupported } from './rt_wasm.js';
import { checkParams, decode, makeRng } from './sampling.js';

const WARMUP_STEPS = 4; // V8 tiers the step's JS up while it runs: a few steps after load, then reset
// Queued messages (Stop) are let in every YIELD_MS, not after every token: a token is ~16 ms at 169M, and a round
// trip through the event loop per token is time in which the helper threads idle
const YIELD_MS = 25;
// Tokens go to the page in batches, one message every TOKENS_MS (and before 'done'), not one a token: each message
// wakes the page's main thread, which takes a core from the runner or its helper (~0.5 ms of main-thread CPU a token
// measured at 169M on 2 cores, per-thread CPU from /proc); the page draws text every RENDER_INTERVAL_MS anyway
const TOKENS_MS = 50;
let rt = null;
let stopRequested = false;
let busy = false;
const post = (msg) => self.postMessage(msg);

async function load({ manifest, variant, modelBase, verify, numThreads }) {
  const t0 = performance.now();
  const why = unsupported(manifest, variant);
  if (why) throw new Error(why);
  const graph = stepGraph(manifest, variant);
  const r = await fetchGraphFiles(manifest, modelBase, [graph], verify, post);
  post({ type: 'progress', phase: 'session' });
  const tS = performance.now();
  rt?.dispose();
  rt = await RwkvWasm.create(manifest, variant, r.files, { threads: numThreads });
  r.files.clear();
  const sessionSeconds = (performance.now() - tS) / 1000;
  const tW = performance.now();
  for (let i = 0; i < WARMUP_STEPS; i++) rt.step(0);
  rt.reset();
  post({
    type: 'loaded',
    info: {
      variant, backend: BACKEND, io: 'wasm-native', numThreads: rt.threads, file: graph.file, sequence: null,
      bytes: r.bytes, downloadSeconds: r.seconds, verifySeconds: r.verifySeconds, sessionSeconds,
      warmupSeconds: (performance.now() - tW) / 1000, warmupSteps: WARMUP_STEPS,
      totalSeconds: (performance.now() - t0) / 1000, crossOriginIsolated: globalThis.crossOriginIsolated === true,
      kernel: rt.mode, wasmBytes: rt.bytes, runtime: 'rt_wasm.js (hand-written wasm SIMD, no onnxruntime)',
    },
  });
}

async function generate({ promptIds, params, eosId }) {
  if (!rt) throw new Error('no model loaded');
  checkParams(params);
  if (!promptIds.length) throw new Error('the prompt is empty (it encodes to no tokens)');
  const bad = promptIds.find((id) => !(Number.isInteger(id) && id >= 0 && id < rt.V));
  if (bad !== undefined) throw new Error(`prompt token id ${bad} is outside the model's vocab [0, ${rt.V})`);
  const rng = makeRng(params.seed);
  stopRequested = false;
  let lastYield = performance.now();
  const pause = () => {
    const now = performance.now();
    if (now - lastYield < YIELD_MS) return null;
    lastYield = now;
    return yieldToEvents();
  };
  let batch = [];
  let lastFlush = performance.now();
  let last = null;
  const flush = () => {
    if (batch.length) post({ type: 'tokens', ids: batch, n: last.n, ms: last.ms });
    batch = [];
    lastFlush = performance.now();
  };
  const postToken = (msg) => {
    if (msg.type !== 'token') { post(msg); return; }
    batch.push(msg.id);
    last = msg;
    if (msg.n === 1 || performance.now() - lastFlush >= TOKENS_MS) flush(); // the first token at once
  };
  rt.reset();
  const t0 = performance.now();
  let logits;
  let runs = 0;
  for (const id of promptIds) {
    logits = rt.step(id);
    runs++;
    await pause();
    if (stopRequested) break;
  }
  const t1 = performance.now();
  post({ type: 'prompt', tokens: promptIds.length, ms: t1 - t0, mode: 'step', runs });
  const { ids, reason, modelMs } = await decode({
    logits, step: (id) => rt.step(id), params, eosId, rng, post: postToken,
    stopped: () => stopRequested, pause, t1,
  });
  const t2 = performance.now();
  flush();
  post({
    type: 'done', ids, reason, promptTokens: promptIds.length, promptMs: t1 - t0, promptMode: 'step', promptRuns: runs,
    generatedTokens: ids.length, generateMs: t2 - t1, modelMs,
  });
}

self.onmessage = ({ data: msg }) => {
  if (msg.type === 'stop') { stopRequested = true; return; }
  if (busy) { post({ type: 'error', phase: msg.type, message: 'busy: wait for the current run to finish' }); return; }
  busy = true;
  const job = msg.type === 'load' ? load(msg) : msg.type === 'generate' ? generate(msg) : Promise.reject(new Error(`unknown message type ${msg.type}`));
  job.catch((e) => post({ type: 'error', phase: msg.type === 'load' ? 'runtime' : msg.type, message: errorText(e).split('\n')[0] }))
    .finally(() => { busy = false; });
};

post({ type: 'ready' });
