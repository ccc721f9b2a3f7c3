// What the runtime adapters of runtimes.html share (rt_ort.js, rt_tfjs.js, rt_tflite.js): downloading a graph's files
// (size and sha256 checked against the manifest), the initial state from the manifest, loading a UMD script once, and
// running an adapter in a Web Worker (openInWorker, rt_worker.js) behind the same runner interface.
//
// An adapter's open({manifest, modelBase, graph, seq, backend, threads, verify}) resolves to a runner:
//   { backend, threads, notes: [..], promptInfo: {graph, chunk, fixed}|null, bytes,
//     reset(), step(id) -> Float32Array logits, prompt(ids) -> Float32Array logits (null where promptInfo is),
//     wasmBytes() -> bytes of the runtime's wasm memory or null, dispose() }
// step/prompt may return promises. Anything a runtime cannot do is thrown as a RuntimeLimit naming the runtime's
// limit and, where there is one, the exporter change that would lift it.

import { errorText, fetchGraphFiles } from './fetch_files.js';

export class RuntimeLimit extends Error {
  constructor(message, fix = null) {
    super(fix ? `${message} Fix: ${fix}` : message);
    this.name = 'RuntimeLimit';
    this.fix = fix;
  }
}

export const NPM = '/node_modules/';

export { errorText };

// Every file of the graphs (each once), checked against the manifest's sizes and sha256: Map file -> Uint8Array.
export async function fetchFiles(manifest, modelBase, graphs, verify = true) {
  return (await fetchGraphFiles(manifest, modelBase, graphs, verify)).files;
}

// name -> Float32Array of the manifest's init value (state tensors are fixed-shape float32 in every target's I/O)
export function initialState(manifest, io) {
  const init = new Map(manifest.state.tensors.map((t) => [t.name, t.init ?? 0]));
  const out = {};
  for (const [name, spec] of io.stateIn) {
    if (spec.dtype !== 'float32') throw new RuntimeLimit(`state ${name} is ${spec.dtype}; runtimes.html feeds float32 states`);
    out[name] = new Float32Array(spec.shape.reduce((a, b) => a * b, 1)).fill(init.get(name));
  }
  return out;
}

// The last row of a [.., V] logits array.
export function lastRow(data, vocab) {
  return data.length === vocab ? data : data.subarray(data.length - vocab);
}

// A classic (UMD) script, once per page: TF.js's packages set globals (tf, tflite) and are built for <script> tags.
// `claimSrc`: the src the script sees as its own (document.currentScript.getAttribute('src')), where it differs.
// In a worker (rt_worker.js) there is no document: importScripts loads the script, and it sees its own URL.
const scripts = new Map();
export function loadScript(src, claimSrc = null) {
  if (!scripts.has(src) && typeof document === 'undefined') {
    scripts.set(src, (async () => {
      try {
        importScripts(src);
      } catch (e) {
        throw new Error(`cannot load ${src} (run \`npm ci --prefix web_demo\`): ${e.message}`);
      }
    })());
  }
  if (!scripts.has(src)) {
    scripts.set(src, new Promise((resolve, reject) => {
      const el = document.createElement('script');
      el.src = src;
      if (claimSrc) el.getAttribute = (name) => (name === 'src' ? claimSrc : Element.prototype.getAttribute.call(el, name));
      el.onload = resolve;
      el.onerror = () => reject(new Error(`cannot load ${src} (run \`npm ci --prefix web_demo\`)`));
      document.head.appendChild(el);
    }));
  }
  return scripts.get(src);
}

export async function webgpuAdapter() {
  if (!navigator.gpu) return { ok: false, why: 'this browser has no WebGPU (navigator.gpu is missing)' };
  const adapter = await Promise.race([navigator.gpu.requestAdapter(), new Promise((r) => setTimeout(() => r('timeout'), 5000))]);
  if (adapter === 'timeout') return { ok: false, why: 'requestAdapter() did not answer' };
  if (!adapter) return { ok: false, why: 'navigator.gpu.requestAdapter() found no GPU adapter' };
  return { ok: true, adapter };
}

// An adapter's open() in a dedicated worker (rt_worker.js): the same runner interface, every call a message (step,
// prompt and reset return promises; wasmBytes is not measured there). `module`: the adapter's URL.
export async function openInWorker(module, options) {
  const worker = new Worker(new URL('./rt_worker.js', import.meta.url));
  const pending = new Map();
  let next = 0;
  const failAll = (err) => {
    for (const p of pending.values()) p.reject(err);
    pending.clear();
  };
  worker.onmessage = ({ data }) => {
    const p = pending.get(data.id);
    pending.delete(data.id);
    if (!data.error) return p.resolve(data.value);
    const { name, message, fix } = data.error;
    const err = name === 'RuntimeLimit' ? new RuntimeLimit(message) : new Error(message);
    err.fix = fix;
    p.reject(err);
  };
  worker.onerror = (e) => failAll(new Error(`the runtime's worker failed: ${e.message ?? 'error'}`));
  const call = (op, args = null) => new Promise((resolve, reject) => {
    const id = next++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, op, args });
  });
  let info;
  try {
    info = await call('open', { module: new URL(module, import.meta.url).href, options });
  } catch (e) {
    worker.terminate();
    throw e;
  }
  return {
    backend: info.backend, threads: info.threads, bytes: info.bytes, notes: [...info.notes, 'runs in a Web Worker'],
    promptInfo: info.promptInfo, prompt: info.hasPrompt ? (ids) => call('prompt', ids) : null,
    reset: () => call('reset'), step: (id) => call('step', id), wasmBytes: () => null,
    async dispose() { worker.terminate(); }, // frees the worker's wasm memory with it
  };
}
