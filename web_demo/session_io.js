// How a graph's inputs and outputs move between onnxruntime-web runs (worker.js drives it). Three modes:
//   'cpu'     wasm: the state tensors onnxruntime returns are the next run's inputs; logits come back as a CPU tensor.
//   'gpu'     WebGPU: the state never leaves the GPU. Two preallocated sets of state buffers are used alternately
//             (run n reads set n%2 and writes the other, given to run() as fetches); the logits stay on the GPU too
//             and only the last row (what sampling needs) is copied back through one staging buffer.
//   'capture' WebGPU with onnxruntime's graph capture (enableGraphCapture): onnxruntime binds the inputs and outputs
//             on the first run and replays the recorded dispatches after that, so every buffer is fixed: the token
//             is written into its buffer, the logits land in a fixed buffer, and the new state is copied onto the
//             input set on the GPU after each run (a few hundred kB, one command buffer with the logits readback).
// A GpuState is shared by a variant's step and prompt graphs (same state shapes), so a prompt's state reaches the
// first decode step without leaving the GPU.

import { float16BitsToFloat32, float32ToFloat16Bits } from './manifest.js';

const GPU_USAGE = 0x80 /* STORAGE */ | 0x4 /* COPY_SRC */ | 0x8; /* COPY_DST */
const MAP_READ = 0x1;
const MAP_DST = 0x8; // COPY_DST
const BYTES = { float32: 4, float16: 2, int64: 8, int32: 4 };

const count = (shape) => shape.reduce((a, b) => a * b, 1);
const align = (n, a) => Math.ceil(n / a) * a;

// n values (a float16 array padded to whole 4-byte words: writeBuffer copies multiples of 4 bytes)
function initData(dtype, n, value) {
  return dtype === 'float16' ? new Uint16Array(align(n, 2)).fill(float32ToFloat16Bits(value)) : new Float32Array(n).fill(value);
}

export function tokenTensor(ort, spec, ids) {
  const shape = spec.shape.map((d) => (typeof d === 'number' ? d : ids.length));
  if (count(shape) !== ids.length) throw new Error(`input ${spec.name}: shape ${JSON.stringify(spec.shape)} cannot hold ${ids.length} tokens`);
  const data = spec.dtype === 'int64' ? BigInt64Array.from(ids, (x) => BigInt(x)) : Int32Array.from(ids);
  return new ort.Tensor(spec.dtype, data, shape);
}

// The last `vocab` values of a logits array (float16 bits or float32) as float32.
export function lastRow(data, dtype, vocab) {
  const start = data.length - vocab;
  if (dtype !== 'float16') return data.subarray(start);
  const out = new Float32Array(vocab);
  if (typeof Float16Array !== 'undefined' && data instanceof Float16Array) out.set(data.subarray(start));
  else for (let i = 0; i < vocab; i++) out[i] = float16BitsToFloat32(data[start + i]);
  return out;
}

// ---- choices ---------------------------------------------------------------------------------------------------

// What to try, in order, for a backend and the page's io= choice ('auto', 'capture', 'gpu', 'cpu'): a failed attempt
// is reported on the page and the next one tried. WebGPU: graph capture with the state on the GPU, then the state on
// the GPU without capture, then wasm. 'cpu' on WebGPU sends the state through the CPU at every run (the old way; for
// comparisons).
export function attempts(backend, io = 'auto') {
  if (backend !== 'webgpu') return [{ backend: 'wasm', mode: 'cpu' }];
  const gpu = { auto: ['capture', 'gpu'], capture: ['capture'], gpu: ['gpu'], cpu: ['cpu'] }[io];
  if (!gpu) throw new Error(`unknown io mode '${io}' (auto, capture, gpu, cpu)`);
  return [...gpu.map((mode) => ({ backend: 'webgpu', mode })), { backend: 'wasm', mode: 'cpu' }];
}

// Where onnxruntime placed the nodes (after its graph optimizations), from its verbose session log:
// " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 3" followed by "  OpType (node name)" lines.
// Returns {counts: {provider: n}, offGpu: [{ep, op, name}]} (offGpu: every node not on WebGPU).
const GPU_EPS = ['WebGpuExecutionProvider', 'JsExecutionProvider']; // the native WebGPU EP, the JS-kernel one

export function nodePlacement(lines) {
  const counts = {};
  const offGpu = [];
  let ep = null;
  for (const raw of lines.flatMap((l) => l.split('\n'))) {
    const line = raw.replace(/^.*?\] /, ''); // drop the "2026-... [V:onnxruntime:, file.cc:123 Func] " prefix
    const head = /(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)/.exec(line);
    if (head) {
      ep = head[1];
      counts[ep] = (counts[ep] ?? 0) + Number(head[2]);
      continue;
    }
    const node = /^\s+(\S+) \((.*)\)\s*$/.exec(line);
    if (node && ep && !GPU_EPS.includes(ep)) offGpu.push({ ep, op: node[1], name: node[2] });
    else if (!node) ep = null;
  }
  return { counts, offGpu };
}

// ---- state ------------------------------------------------------------------------------------------------------

export class CpuState {
  constructor(ort, manifest, io) {
    Object.assign(this, { ort, manifest, io, tensors: null, mode: 'cpu' });
  }

  reset() {
    this.tensors = {};
    for (const t of this.manifest.state.tensors) {
      const spec = this.io.stateIn.get(t.name);
      const n = count(spec.shape);
      this.tensors[t.name] = new this.ort.Tensor(spec.dtype, initData(spec.dtype, n, t.init).subarray(0, n), spec.shape);
    }
  }

  feeds(io) {
    return Object.fromEntries(io.names.map((n) => [io.stateIn.get(n).name, this.tensors[n]]));
  }

  fetches(io) {
    return Object.fromEntries(io.names.map((n) => [io.stateOut.get(n).name, null]));
  }

  commit(io, out) {
    for (const n of io.names) this.tensors[n] = out[io.stateOut.get(n).name];
  }
}

export class GpuState {
  // fixed: one input set and one output set, the output copied onto the input after each run (graph capture);
  // otherwise the two sets swap roles after each run.
  constructor(ort, device, manifest, io, { fixed }) {
    Object.assign(this, { ort, device, manifest, fixed, cur: 0, mode: fixed ? 'capture' : 'gpu' });
    this.specs = manifest.state.tensors.map((t) => ({ ...io.stateIn.get(t.name), state: t.name, init: t.init }));
    this.sets = [0, 1].map((k) => Object.fromEntries(this.specs.map((s) => {
      const size = align(count(s.shape) * BYTES[s.dtype], 16);
      const buffer = device.createBuffer({ size, usage: GPU_USAGE, label: `state ${s.state} ${k}` });
      return [s.state, { buffer, size, tensor: ort.Tensor.fromGpuBuffer(buffer, { dataType: s.dtype, dims: s.shape }) }];
    })));
    this.bytes = 2 * this.specs.reduce((a, s) => a + count(s.shape) * BYTES[s.dtype], 0);
  }

  reset() {
    this.cur = 0;
    for (const s of this.specs) this.device.queue.writeBuffer(this.sets[0][s.state].buffer, 0, initData(s.dtype, count(s.shape), s.init));
  }

  feeds(io) {
    return Object.fromEntries(io.names.map((n) => [io.stateIn.get(n).name, this.sets[this.cur][n].tensor]));
  }

  fetches(io) {
    return Object.fromEntries(io.names.map((n) => [io.stateOut.get(n).name, this.sets[1 - this.cur][n].tensor]));
  }

  // Called with the command encoder of the run's readback: a fixed state copies out -> in there.
  commit(io, out, encoder) {
    if (!this.fixed) {
      this.cur = 1 - this.cur;
      return;
    }
    for (const n of io.names) {
      const src = this.sets[1][n];
      encoder.copyBufferToBuffer(src.buffer, 0, this.sets[0][n].buffer, 0, src.size);
    }
  }

  destroy() {
    for (const set of this.sets) for (const v of Object.values(set)) v.buffer.destroy();
  }
}

// ---- graph capture and external buffers -------------------------------------------------------------------------

// onnxruntime-web 1.30 registers an external GPU buffer (Tensor.fromGpuBuffer) at each run() and drops the
// registration when run() returns (a count kept on the GPUBuffer under a private symbol). With graph capture the
// first run's bindings are kept and replayed, so they would point at dropped buffers ("createBindGroup: Required
// member is undefined"). Buffers onnxruntime allocates itself are registered for good (the count is NaN).
// pinBuffers gives ours the same: the symbol is read off an output buffer of a one-node session (Identity).
const IDENTITY_ONNX = 'CAgSADo4ChAKAXgSAXkiCElkZW50aXR5EgJpZFoPCgF4EgoKCAgBEgQKAggEYg8KAXkSCgoICAESBAoCCARCBAoAEBI=';

async function metadataSymbol(ort) {
  const bytes = Uint8Array.from(atob(IDENTITY_ONNX), (c) => c.charCodeAt(0));
  const s = await ort.InferenceSession.create(bytes, { executionProviders: ['webgpu'], preferredOutputLocation: 'gpu-buffer' });
  try {
    const { y } = await s.run({ x: new ort.Tensor('float32', new Float32Array(4), [4]) });
    const k = Object.getOwnPropertySymbols(y.gpuBuffer).find((x) => x.description === 'gpuBufferMetadata');
    y.dispose();
    return k ?? null; // none: a build that keeps registrations itself (the JS-kernel EP registers per session)
  } finally {
    await s.release();
  }
}

export async function pinBuffers(ort, buffers) {
  const k = await metadataSymbol(ort);
  if (!k) return;
  for (const buf of buffers) {
    let meta;
    Object.defineProperty(buf, k, {
      configurable: true,
      get: () => meta,
      set: (v) => {
        if (Array.isArray(v) && v[1] === 1) v[1] = NaN; // registered for good
        meta = v;
      },
    });
  }
}

// ---- one graph --------------------------------------------------------------------------------------------------

// Session options for a graph in a mode: where each output should be.
export function sessionOptions(mode, io) {
  if (mode === 'cpu') return {};
  const loc = { [io.logits.name]: 'gpu-buffer' };
  for (const n of io.names) loc[io.stateOut.get(n).name] = 'gpu-buffer';
  return mode === 'capture' ? { enableGraphCapture: true, preferredOutputLocation: loc } : { preferredOutputLocation: loc };
}

export class GraphRunner {
  // part: {session, io, graph}; state: a CpuState or GpuState; capture: this session was made with graph capture.
  constructor(ort, part, state, vocab, { capture = false, device = null } = {}) {
    Object.assign(this, { ort, part, state, vocab, capture, device });
    const { io } = part;
    this.logitsBytes = BYTES[io.logits.dtype];
    if (device) {
      // the last row of the logits, 4-byte aligned at both ends (a float16 row may start mid-word)
      this.staging = device.createBuffer({ size: align(vocab * this.logitsBytes, 4) + 4, usage: MAP_READ | MAP_DST, label: 'logits readback' });
    }
    if (capture) {
      const shape = io.token.shape;
      if (!shape.every(Number.isInteger)) throw new Error(`graph capture needs static shapes; ${io.token.name} is ${JSON.stringify(shape)}`);
      const tb = align(count(shape) * BYTES[io.token.dtype], 16);
      this.tokenBuffer = device.createBuffer({ size: tb, usage: GPU_USAGE, label: 'token' });
      this.tokenFeed = ort.Tensor.fromGpuBuffer(this.tokenBuffer, { dataType: io.token.dtype, dims: shape });
      const ls = io.logits.shape;
      if (!ls.every(Number.isInteger)) throw new Error(`graph capture needs static shapes; ${io.logits.name} is ${JSON.stringify(ls)}`);
      this.logitsBuffer = device.createBuffer({ size: align(count(ls) * this.logitsBytes, 16), usage: GPU_USAGE, label: 'logits' });
      this.logitsFetch = ort.Tensor.fromGpuBuffer(this.logitsBuffer, { dataType: io.logits.dtype, dims: ls });
    }
  }

  // One run on `ids`; returns the last row of the logits as float32, or null when !wantLogits (a prompt's inner
  // chunks: on the GPU nothing is read back then).
  async run(ids, wantLogits = true) {
    const { ort, part: { session, io }, state } = this;
    let tokenFeed;
    if (this.capture) {
      const data = io.token.dtype === 'int64' ? BigInt64Array.from(ids, (x) => BigInt(x)) : Int32Array.from(ids);
      this.device.queue.writeBuffer(this.tokenBuffer, 0, data);
      tokenFeed = this.tokenFeed;
    } else tokenFeed = tokenTensor(ort, io.token, ids);
    const feeds = { [io.token.name]: tokenFeed, ...state.feeds(io) };
    const fetches = { ...state.fetches(io), [io.logits.name]: this.capture ? this.logitsFetch : null };
    const out = await session.run(feeds, fetches);
    const logits = out[io.logits.name];
    if (!this.device) {
      state.commit(io, out);
      return lastRow(logits.data, io.logits.dtype, this.vocab);
    }
    const encoder = this.device.createCommandEncoder();
    let shift = 0;
    let rowBytes = 0;
    if (wantLogits) {
      const total = count(logits.dims) * this.logitsBytes;
      const start = total - this.vocab * this.logitsBytes;
      const from = start - (start % 4);
      shift = start - from;
      rowBytes = align(shift + this.vocab * this.logitsBytes, 4);
      encoder.copyBufferToBuffer(logits.gpuBuffer, from, this.staging, 0, rowBytes);
    }
    state.commit(io, out, encoder);
    this.device.queue.submit([encoder.finish()]);
    if (!this.capture) logits.dispose(); // its buffer goes back to onnxruntime's pool (the copy is already queued)
    if (!wantLogits) return null;
    await this.staging.mapAsync(MAP_READ, 0, rowBytes);
    const bytes = this.staging.getMappedRange(0, rowBytes).slice(shift, shift + this.vocab * this.logitsBytes);
    this.staging.unmap();
    const row = io.logits.dtype === 'float16' ? new Uint16Array(bytes) : new Float32Array(bytes);
    return lastRow(row, io.logits.dtype, this.vocab);
  }

  // the external buffers this runner binds (graph capture pins them)
  boundBuffers() {
    const state = this.state.sets ? this.state.sets.flatMap((set) => Object.values(set).map((v) => v.buffer)) : [];
    return [this.tokenBuffer, this.logitsBuffer, ...state].filter(Boolean);
  }

  destroy() {
    for (const b of [this.staging, this.tokenBuffer, this.logitsBuffer]) b?.destroy();
  }
}
