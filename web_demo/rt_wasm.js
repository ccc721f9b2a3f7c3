// wasm-native: our own WebAssembly SIMD runtime for the RWKV-4 int8 step ("dynamic-int7" model_int8.onnx), no
// onnxruntime. Why: onnxruntime-web's wasm backend spends 97% of a 169M token inside session.run and reaches ~39
// tok/s on a 2-core box where native onnxruntime does ~74 on the same file; a step is ~130 MB of int8 weights, so the
// matvecs are what counts, and they can be a few tight SIMD loops (rwkv4_int8.wat) instead of ~580 ONNX nodes.
//
// What it runs: the initializers of the int8 step .onnx, read by name (onnx_weights.js; the graph's nodes are not
// read): int8 weights [K, N] with a scale per output column and zero point 0 (*_quantized, *_scale, *_zero_point),
// the int8 embedding rows with a scale per row (emb_qint8, emb_row_scale), fp32 LayerNorm/mix/decay vectors. The step
// is the graph's arithmetic in the graph's order: each MatMul is DynamicQuantizeLinear of the activation (uint8, one
// scale and zero point per token, ONNX's formula with round-half-to-even), the exact int32 dot product
// sum_k (a_q[k] - zp) * w[k, n] (in wasm), then float32(acc) * float32(a_scale * w_scale[n]). Elementwise math is
// float32, one rounding after every operation as onnxruntime computes it, also in wasm (rwkv4_int8.wat: layernorm,
// mix, wkv, add, relusq, addsigmul; step() calls them between the matvecs, so a token is a few hundred cheap calls
// and no float loop in JS). stepJs() is the same step in JS (Math.fround after every operation), kept as the
// reference: the two give bit-identical logits (tests/test_wasm_native.py), exp aside (wasm: a double polynomial
// rounded to float32; JS: Math.exp rounded: they agree on all of 2^20 test values). exp, sigmoid and LayerNorm's
// sums are not onnxruntime's own code, so they may differ from it in the last bit, and where such a bit moves an
// activation across a quantization rounding boundary one uint8 step differs (the same happens between native
// onnxruntime and onnxruntime-web: rwkv_export/quantize.py).
//
// Kernels (rwkv4_int8.wat): mode 'u8' (relaxed dot with the uint8 activations, used where the load-time probe shows
// the browser computes it exactly and all weights are in [-64, 64]), 'nib' (the activation split into two nibbles:
// exact everywhere relaxed SIMD exists), 'i16' (plain SIMD128). Threads: the runner's thread plus threads - 1 helper
// workers (rt_wasm_worker.js) on one shared wasm memory; each matvec's outputs go in chunks of 64 that the threads
// claim; a helper writes its chunks to its own copy of the output slots, and the runner's thread takes them over
// once it has nothing left to claim, computing itself any chunk a helper claimed but has not finished within PATIENCE
// polls (so a helper that the OS preempts mid-chunk costs a chunk, not the preemption). The helpers spin SPIN polls,
// then sleep in memory.atomic.wait64. Shared memory needs cross-origin isolation (rwkv-export serve sends the
// headers); without it the runtime refuses to load, in one line. The prompt runs as a loop of steps (no prompt kernels yet).
//
// open() is runtimes.html's adapter (rt_common.js); RwkvWasm is the runtime itself.

import { fetchGraphFiles } from './fetch_files.js';
import { stepGraph } from './manifest.js';
import { DTYPE_CODES, onnxInitializers, tensorBytes } from './onnx_weights.js';

export const BACKEND = 'wasm-native';
export const MODES = ['u8', 'nib', 'i16'];
const MODE_CODE = { u8: 0, nib: 1, i16: 2 };
const STATE_NAMES = ['att_x', 'att_aa', 'att_bb', 'att_pp', 'ffn_x'];
const SPIN = 1 << 16; // helper polls before it sleeps (~0.1 ms): a token's matvecs follow each other closer than that
// the runner's polls (a few ns each, all chunks of a matvec together: ~10-30 us) for the chunks a helper is still
// computing at a matvec's end, a chunk taking 5-25 us to stream: longer means a preempted helper costs more, shorter
// that the runner redoes chunks a running helper was about to finish
const PATIENCE = 1 << 13;
const CTL = 0; // control block (rwkv4_int8.wat), 256 bytes
const MAX_THREADS = 6;
const PAGE = 65536;
const EPS = Math.fround(1e-5);
const EXP_BATCH = 4096;
const ELEMENTWISE = ['wasm', 'js'];
const LAYER_VECS = ['ln1w', 'ln1b', 'attMix', 'first', 'decay', 'ln2w', 'ln2b', 'ffnMix'];
const f = Math.fround;

export class WasmNativeError extends Error {}
const fail = (msg) => { throw new WasmNativeError(msg); };

// One line for a folder/variant this runtime cannot run; null when it can.
export function unsupported(manifest, variant) {
  const d = manifest.model;
  if (String(d.rwkv_version) !== '4') return `wasm-native runs RWKV-4 only; this model is RWKV-${d.rwkv_version} (use wasm)`;
  if (variant !== 'int8') return `wasm-native runs the int8 variant only, not '${variant}' (use wasm for it)`;
  let g;
  try {
    g = stepGraph(manifest, variant);
  } catch (e) {
    return e.message;
  }
  const q = g.quantization ?? {};
  if (q.method !== 'dynamic-int7') return `wasm-native runs int8 method dynamic-int7 only; this file is '${q.method}' (use wasm)`;
  if (q.options?.include_embedding === false) return 'wasm-native needs the int8 embedding rows (include_embedding); this file keeps it fp32 (use wasm)';
  const names = manifest.state.tensors.map((t) => t.name);
  if (names.join() !== STATE_NAMES.join()) return `wasm-native expects the RWKV-4 state ${STATE_NAMES.join(', ')}; the manifest has ${names.join(', ')}`;
  if (d.n_embd % 16 || d.ffn_dim % 16) return `wasm-native needs n_embd and ffn_dim divisible by 16 (has ${d.n_embd}, ${d.ffn_dim})`;
  return null;
}

// The module's bytes, once per URL (rwkv4_int8.wasm beside this file).
const modules = new Map();
export function wasmModule(url = new URL('./rwkv4_int8.wasm', import.meta.url).href) {
  if (!modules.has(url)) {
    modules.set(url, (async () => {
      const res = await fetch(url);
      if (!res.ok) fail(`cannot fetch ${url}: HTTP ${res.status}`);
      try {
        return await WebAssembly.compile(await res.arrayBuffer());
      } catch (e) {
        fail(`this browser cannot compile rwkv4_int8.wasm (it needs WebAssembly SIMD, relaxed SIMD and threads): ${e.message}`);
      }
    })());
  }
  return modules.get(url);
}

const sigmoid = (x) => f(1 / f(1 + f(Math.exp(-x))));

export class RwkvWasm {
  // files: Map file name -> bytes holding the graph's .onnx and data files. options: {threads, mode, module, spin,
  // patience, elementwise} (spin: the helpers' polls before they sleep; 0 = sleep at once, woken by memory.atomic.notify every
  // matvec; patience: the polls the runner's thread waits at the end of a matvec for chunks still running on a helper
  // before it computes them itself; elementwise: 'wasm' (step) or 'js' (stepJs, the float32 JavaScript reference, for
  // tests and benchmarks))
  static async create(manifest, variant, files,
    { threads = 1, mode = null, module = null, spin = SPIN, patience = PATIENCE, elementwise = 'wasm' } = {}) {
    if (!ELEMENTWISE.includes(elementwise)) fail(`wasm-native has no elementwise '${elementwise}' (has ${ELEMENTWISE.join(', ')})`);
    const why = unsupported(manifest, variant);
    if (why) fail(why);
    // the module imports a shared memory (one module for 1 or more threads), which needs cross-origin isolation
    if (!globalThis.crossOriginIsolated) fail('wasm-native needs cross-origin isolation for its shared wasm memory (serve the demo with `rwkv-export serve`)');
    threads = Math.max(1, Math.min(MAX_THREADS, threads | 0));
    const rt = new RwkvWasm(manifest, variant, files, threads);
    rt.spin = spin;
    rt.patience = patience;
    if (elementwise === 'js') rt.step = rt.stepJs;
    rt.elementwise = elementwise;
    await rt.init(module ?? await wasmModule(), mode);
    return rt;
  }

  constructor(manifest, variant, files, threads) {
    const graph = stepGraph(manifest, variant);
    const d = manifest.model;
    Object.assign(this, { manifest, variant, graph, threads, L: d.n_layer, C: d.n_embd, F: d.ffn_dim, V: d.vocab_size, workers: [] });
    const onnx = files.get(graph.file);
    if (!onnx) fail(`${graph.file} was not downloaded`);
    const inits = onnxInitializers(onnx);
    this.tensor = (name, dims, dtype) => {
      const t = inits.get(name);
      if (!t) fail(`${graph.file} has no initializer '${name}': not an rwkv-export RWKV-4 int8 step graph of this version`);
      if (JSON.stringify(t.dims) !== JSON.stringify(dims)) fail(`${graph.file}: ${name} has shape ${JSON.stringify(t.dims)}, expected ${JSON.stringify(dims)}`);
      if (DTYPE_CODES[t.dtype] !== dtype) fail(`${graph.file}: ${name} is ONNX data type ${t.dtype}, expected ${dtype}`);
      const b = tensorBytes(t, graph, files);
      if (dtype === 'int8') return new Int8Array(b.buffer, b.byteOffset, b.length); // read once, when packed
      return new Float32Array(new Uint8Array(b).buffer); // a copy: aligned, independent of the download
    };
  }

  async init(module, mode) {
    const { L, C, F, V, tensor } = this;
    const vec = (name, n) => tensor(name, [n], 'float32');
    const mats = [];
    const mat = (name, K, N) => {
      const w = tensor(`${name}_quantized`, [K, N], 'int8');
      const zp = tensor(`${name}_zero_point`, [N], 'int8');
      if (zp.some((z) => z !== 0)) fail(`${this.graph.file}: ${name} has nonzero weight zero points (not dynamic-int7)`);
      const m = { name, K, N, w, scale: vec(`${name}_scale`, N), nb: Math.ceil(N / 16) };
      mats.push(m);
      return m;
    };
    this.emb = new Int8Array(tensor('emb_qint8', [V, C], 'int8')); // a copy: the download is let go after load
    this.embScale = vec('emb_row_scale', V);
    this.layers = [];
    for (let i = 0; i < L; i++) {
      const p = `layers.${i}.`;
      this.layers.push({
        ln1w: vec(`${p}ln1_w`, C), ln1b: vec(`${p}ln1_b`, C), attMix: tensor(`${p}att_mix`, [3, C], 'float32'),
        first: vec(`${p}att_first`, C), decay: vec(`${p}att_decay`, C),
        key: mat(`${p}att_key`, C, C), value: mat(`${p}att_value`, C, C), recept: mat(`${p}att_receptance`, C, C),
        output: mat(`${p}att_output`, C, C),
        ln2w: vec(`${p}ln2_w`, C), ln2b: vec(`${p}ln2_b`, C), ffnMix: tensor(`${p}ffn_mix`, [2, C], 'float32'),
        fkey: mat(`${p}ffn_key`, C, F), frecept: mat(`${p}ffn_receptance`, C, C), fvalue: mat(`${p}ffn_value`, F, C),
      });
    }
    this.lnOutW = vec('ln_out_w', C);
    this.lnOutB = vec('ln_out_b', C);
    this.head = mat('head', C, V);

    // memory: control block, then 4 slots of: quant's scale and zero point (info), the float32 input of quant (xin),
    // the quantized activation (act, 2 bytes a k), the int32 sums / float32 outputs (out); then per matrix its colsum,
    // weight scales and packed weights
    const Kmax = Math.max(C, F);
    const Nmax = Math.max(...mats.map((m) => m.nb * 16));
    const align = (n) => Math.ceil(n / 64) * 64;
    let at = 256;
    const take = (n) => { const a = at; at += align(n); return a; };
    this.info = [0, 1, 2, 3].map(() => take(16));
    this.xin = [0, 1, 2, 3].map(() => take(4 * Kmax));
    this.act = [0, 1, 2, 3].map(() => take(2 * Kmax));
    // the output slots, one copy per thread (a helper writes its chunks to its own copy: rwkv4_int8.wat's run)
    const slot = align(4 * Nmax);
    const outBase = take(this.threads * 4 * slot);
    this.out = [0, 1, 2, 3].map((s) => outBase + s * slot);
    this.outSpan = 4 * slot;
    this.donePtr = take(4 * mats.reduce((n, m) => n + Math.ceil(m.nb / 4), 1)); // a tag per chunk of a job
    // the step's float32 vectors: x, xx, the state (5 x L x C), each layer's LayerNorm/mix/decay vectors, ln_out's
    this.xPtr = take(4 * C);
    this.xxPtr = take(4 * C);
    this.statePtr = take(4 * 5 * L * C);
    const vecs = [];
    const place = (obj, key) => { const v = obj[key]; obj[`${key}Ptr`] = take(4 * v.length); vecs.push([obj, key]); };
    for (const ly of this.layers) for (const key of LAYER_VECS) place(ly, key);
    place(this, 'lnOutW');
    place(this, 'lnOutB');
    this.expPtr = take(4 * EXP_BATCH); // expf's buffer (tests)
    for (const m of mats) {
      m.colsumPtr = take(4 * m.nb * 16);
      m.scalePtr = take(4 * m.nb * 16);
      m.ptr = take(m.nb * 16 * m.K);
    }
    const pages = Math.ceil(at / PAGE);
    this.memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
    this.instance = await WebAssembly.instantiate(module, { env: { mem: this.memory } });
    this.u8 = new Uint8Array(this.memory.buffer);
    this.i8 = new Int8Array(this.memory.buffer);
    this.i16 = new Int16Array(this.memory.buffer);
    this.i32 = new Int32Array(this.memory.buffer);
    this.f32 = new Float32Array(this.memory.buffer);
    this.i32[(CTL >> 2) + 4] = this.outSpan;
    this.i32[(CTL >> 2) + 5] = this.donePtr;
    this.i32[(CTL >> 2) + 6] = this.patience;
    this.xinF = this.xin.map((p) => this.f32.subarray(p >> 2, (p >> 2) + Kmax));
    this.outF = this.out.map((p) => this.f32.subarray(p >> 2, (p >> 2) + Nmax));
    this.bytes = at;
    // the JS arrays become views of their copies in the wasm memory (the JS reference step reads the same data)
    for (const [obj, key] of vecs) {
      const v = obj[key];
      const view = this.f32.subarray(obj[`${key}Ptr`] >> 2, (obj[`${key}Ptr`] >> 2) + v.length);
      view.set(v);
      obj[key] = view;
    }

    // the kernel: the fastest exact one (u8 where the probe says the relaxed dot is exact here and |w| <= 64)
    let maxAbs = 0;
    for (const m of mats) {
      const w = m.w;
      for (let i = 0; i < w.length; i++) { const v = w[i]; if (v > maxAbs) maxAbs = v; else if (-v > maxAbs) maxAbs = -v; }
    }
    this.probe = this.probeU8();
    const auto = this.probe && maxAbs <= 64 ? 'u8' : 'nib';
    if (mode && !MODES.includes(mode)) fail(`wasm-native has no kernel '${mode}' (has ${MODES.join(', ')})`);
    if (mode === 'u8' && !(this.probe && maxAbs <= 64)) {
      fail(`wasm-native kernel u8 is not exact here (${this.probe ? `weights reach ${maxAbs}` : 'this browser\'s relaxed dot is not the x86 one'}); use nib or i16`);
    }
    this.mode = mode ?? auto;
    for (const m of mats) this.pack(m);
    for (const m of mats) m.w = null; // packed into the wasm memory
    this.mats = mats;

    this.state = this.f32.subarray(this.statePtr >> 2, (this.statePtr >> 2) + 5 * L * C);
    this.reset();
    this.x = this.f32.subarray(this.xPtr >> 2, (this.xPtr >> 2) + C);
    this.xx = this.f32.subarray(this.xxPtr >> 2, (this.xxPtr >> 2) + C);
    this.logits = new Float32Array(V);
    this.jobs = this.layers.map((ly) => ({
      kvr: this.jobSpec([this.seg(ly.key, 0), this.seg(ly.value, 1), this.seg(ly.recept, 2)]),
      out: this.jobSpec([this.seg(ly.output, 0)]),
      kr: this.jobSpec([this.seg(ly.fkey, 0), this.seg(ly.frecept, 1)]),
      val: this.jobSpec([this.seg(ly.fvalue, 2)]),
    }));
    this.headJob = this.jobSpec([this.seg(this.head, 3)]);
    if (this.threads > 1) await this.startWorkers(module);
  }

  // Does i32x4.relaxed_dot_i8x16_i7x16_add_s compute the exact uint8 x int8 products here (x86: pmaddubsw without
  // saturation for |w| <= 64, or VNNI)? One block of 16 outputs, K = 16, weights +-64 and 0..63, activations 0..255.
  probeU8() {
    const K = 16;
    const save = this.u8.slice(0, 256 + 16 * K + 64 + K);
    const w = new Int8Array(K * 16);
    const a = new Uint8Array(K);
    for (let k = 0; k < K; k++) a[k] = 255 - 7 * k;
    for (let i = 0; i < w.length; i++) w[i] = [64, -64, 63, -63, (i * 37) % 129 - 64][i % 5];
    const m = { K, N: 16, nb: 1, w, ptr: 256 + K };
    const xs = 256;
    this.u8.set(a, xs);
    this.packInto(m, 'u8');
    const y = 256 + K + 16 * K;
    this.job(0, [[m.ptr, xs, y, K, 1]]);
    let ok = true;
    for (let n = 0; n < 16; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += a[k] * w[k * 16 + n];
      if (this.i32[(y >> 2) + n] !== s) ok = false;
    }
    this.u8.set(save, 0);
    return ok;
  }

  // Weights [K, N] row-major -> per block of 16 outputs, per quad of k, four 16-byte chunks (rwkv4_int8.wat), padded
  // with zero columns; colsum[n] = sum_k w[k, n] for the zero-point correction.
  pack(m) {
    const colsum = this.i32.subarray(m.colsumPtr >> 2, (m.colsumPtr >> 2) + m.nb * 16); // zeros: i16 needs none
    if (this.mode !== 'i16') {
      for (let k = 0; k < m.K; k++) {
        const row = m.w.subarray(k * m.N, (k + 1) * m.N);
        for (let n = 0; n < m.N; n++) colsum[n] += row[n];
      }
    }
    this.f32.set(m.scale, m.scalePtr >> 2);
    this.packInto(m, this.mode);
  }

  // Row k of W goes to quad k >> 2 of every block, at byte POS[c16] + (k & 3) for column c16 of the block (u8/nib:
  // chunk j = c16 >> 2, byte 4 * (c16 & 3) + kk; i16: byte 8 * (kk >> 1) + 2 * (c16 & 3) + (kk & 1)).
  packInto(m, mode) {
    const { K, N, w } = m;
    const dst = this.i8;
    const i16 = mode === 'i16';
    const pos = Int32Array.from({ length: 16 }, (_, c) => 16 * (c >> 2) + (i16 ? 2 * (c & 3) : 4 * (c & 3)));
    const kOff = i16 ? [0, 1, 8, 9] : [0, 1, 2, 3];
    const blockBytes = 16 * K;
    for (let k = 0; k < K; k++) {
      const src = k * N;
      const base = m.ptr + 64 * (k >> 2) + kOff[k & 3];
      for (let n = 0; n < N; n++) dst[base + (n >> 4) * blockBytes + pos[n & 15]] = w[src + n];
    }
  }

  async startWorkers(module) {
    const url = new URL('./rt_wasm_worker.js', import.meta.url);
    const ready = [];
    for (let t = 1; t < this.threads; t++) {
      const wk = new Worker(url, { type: 'module' });
      this.workers.push(wk);
      ready.push(new Promise((resolve, reject) => {
        wk.onmessage = ({ data }) => (data.error ? reject(new WasmNativeError(`wasm-native helper thread: ${data.error}`)) : resolve());
        wk.onerror = (e) => reject(new WasmNativeError(`wasm-native helper thread failed: ${e.message ?? 'error'}`));
      }));
      wk.postMessage({ module, memory: this.memory, ctl: CTL, spin: this.spin, thread: t });
    }
    await Promise.all(ready);
  }

  // One job: segments [w, a, y, K, blocks] (the int32 sums) or [w, a, y, K, blocks, colsum, wscale, info] (dequantized:
  // seg()) of one mode, in chunks of 4 blocks that every thread claims (wasm $work)
  job(mode, segs) {
    this.runJob(this.jobSpec(segs, mode));
  }

  // a job's control words (mode, segment count, segments) and its chunk count, built once
  jobSpec(segs, mode = MODE_CODE[this.mode]) {
    const words = new Int32Array(2 + 8 * segs.length);
    words[0] = mode;
    words[1] = segs.length;
    let chunks = 0;
    segs.forEach((s, i) => { words.set(s, 2 + 8 * i); chunks += Math.ceil(s[4] / 4); });
    if (chunks >= 65536) fail(`wasm-native: a matvec job of ${chunks} chunks (the claim word holds fewer than 65536)`);
    return { words, chunks };
  }

  runJob({ words, chunks }) {
    this.i32.set(words, (CTL >> 2) + 8);
    this.instance.exports.run(CTL, chunks);
  }

  // DynamicQuantizeLinear of xin slot `slot` (K floats) into its activation slot, in this.mode's format (wasm)
  quantize(K, slot) {
    this.instance.exports.quant(this.xin[slot], K, this.act[slot], MODE_CODE[this.mode], this.info[slot]);
  }


  // a matvec of matrix m from activation slot `slot` into its out slot, dequantized there (float32 outputs)
  seg(m, slot) {
    return [m.ptr, this.act[slot], this.out[slot], m.K, m.nb, m.colsumPtr, m.scalePtr, this.info[slot]];
  }


  reset() {
    const { L, C } = this;
    this.manifest.state.tensors.forEach((s, k) => this.state.fill(s.init, k * L * C, (k + 1) * L * C));
  }

  // LayerNormalization as onnxruntime's CPU kernel computes it for float32: sum and sum of squares accumulated in
  // float32 in order, variance = E[x^2] - mean^2 (its rounding error is far above the last bit when the residual
  // stream's mean is large, so a two-pass variance would differ from onnxruntime visibly), y = (x - mean) / sd * w + b.
  layerNorm(x, w, b, out) {
    const C = this.C;
    let sum = 0;
    let sq = 0;
    for (let i = 0; i < C; i++) { const v = x[i]; sum = f(sum + v); sq = f(sq + f(v * v)); }
    const mean = f(sum / C);
    const sd = f(Math.sqrt(f(f(f(sq / C) - f(mean * mean)) + EPS)));
    for (let i = 0; i < C; i++) out[i] = f(f(f(f(x[i] - mean) / sd) * w[i]) + b[i]);
  }

  // One token from the current state: Float32Array logits (this.logits, overwritten by the next step). The elementwise
  // work runs in wasm (rwkv4_int8.wat: layernorm, mix, wkv, add, relusq, addsigmul), a few calls per matvec; the
  // results equal stepJs's to the bit except where the module's exp and Math.exp round to different float32 (rare:
  // the .wat's $exp64 says why).
  step(token) {
    const { L, C, F } = this;
    if (!(token >= 0 && token < this.V)) fail(`token ${token} is outside the vocabulary (0..${this.V - 1})`);
    const e = this.instance.exports;
    const X = this.xPtr; const XX = this.xxPtr;
    const es = this.embScale[token];
    const x = this.x;
    for (let i = 0; i < C; i++) x[i] = f(this.emb[token * C + i] * es);
    const [o0, o1, o2] = this.out;
    const [i0, i1, i2] = this.xin;
    const f32 = this.f32;
    const S = (s, i) => this.statePtr + 4 * (s * L + i) * C;
    for (let i = 0; i < L; i++) {
      const ly = this.layers[i];
      const jobs = this.jobs[i];
      const sx = S(0, i); const fx = S(4, i);
      e.layernorm(X, ly.ln1wPtr, ly.ln1bPtr, XX, C);
      for (let m = 0; m < 3; m++) {
        e.mix(XX, sx, ly.attMixPtr + 4 * m * C, this.xin[m], C);
        this.quantize(C, m);
      }
      f32.copyWithin(sx >> 2, XX >> 2, (XX >> 2) + C);
      this.runJob(jobs.kvr); // k, v, r: out slots 0, 1, 2 (dequantized by the job)
      e.wkv(o0, o1, o2, ly.firstPtr, ly.decayPtr, S(1, i), S(2, i), S(3, i), i0, C);
      this.quantize(C, 0);
      this.runJob(jobs.out);
      e.add(X, o0, C);
      e.layernorm(X, ly.ln2wPtr, ly.ln2bPtr, XX, C);
      e.mix(XX, fx, ly.ffnMixPtr, i0, C);
      this.quantize(C, 0);
      e.mix(XX, fx, ly.ffnMixPtr + 4 * C, i1, C);
      this.quantize(C, 1);
      f32.copyWithin(fx >> 2, XX >> 2, (XX >> 2) + C);
      this.runJob(jobs.kr);
      e.relusq(o0, i2, F);
      this.quantize(F, 2);
      this.runJob(jobs.val);
      e.addsigmul(X, o1, o2, C);
    }
    e.layernorm(X, this.lnOutWPtr, this.lnOutBPtr, this.xin[3], C);
    this.quantize(C, 3);
    this.runJob(this.headJob);
    this.logits.set(this.outF[3].subarray(0, this.V));
    return this.logits;
  }

  // exp of float32 values as the module computes it (tests: against Math.exp): Float32Array in, Float32Array out
  expf(xs) {
    const out = new Float32Array(xs.length);
    for (let i = 0; i < xs.length; i += EXP_BATCH) {
      const n = Math.min(EXP_BATCH, xs.length - i);
      const p = this.expPtr >> 2;
      this.f32.fill(0, p, p + EXP_BATCH);
      this.f32.set(xs.subarray(i, i + n), p);
      this.instance.exports.expf(this.expPtr, this.expPtr, EXP_BATCH);
      out.set(this.f32.subarray(p, p + n), i);
    }
    return out;
  }

  // The same step in float32 JavaScript (the reference the wasm elementwise functions are tested against)
  stepJs(token) {
    const { L, C, F, state, x, xx, xinF } = this;
    if (!(token >= 0 && token < this.V)) fail(`token ${token} is outside the vocabulary (0..${this.V - 1})`);
    const es = this.embScale[token];
    for (let i = 0; i < C; i++) x[i] = f(this.emb[token * C + i] * es);
    const S = (s, i) => state.subarray((s * L + i) * C, (s * L + i + 1) * C);
    for (let i = 0; i < L; i++) {
      const ly = this.layers[i];
      const sx = S(0, i); const aa = S(1, i); const bb = S(2, i); const pp = S(3, i); const fx = S(4, i);
      // time mix: k, v, r from the token-shift mixes (slots 0, 1, 2), then WKV and the output matvec (slot 0)
      this.layerNorm(x, ly.ln1w, ly.ln1b, xx);
      for (let m = 0; m < 3; m++) {
        const mix = ly.attMix.subarray(m * C, (m + 1) * C);
        const dst = xinF[m];
        for (let c = 0; c < C; c++) dst[c] = f(sx[c] + f(f(xx[c] - sx[c]) * mix[c]));
        this.quantize(C, m);
      }
      sx.set(xx);
      this.runJob(this.jobs[i].kvr);
      const k = this.outF[0];
      const v = this.outF[1];
      const r = this.outF[2];
      const u = ly.first; const w = ly.decay; const rw = xinF[0];
      for (let c = 0; c < C; c++) {
        const kc = k[c]; const vc = v[c]; const a0 = aa[c]; const b0 = bb[c]; const p0 = pp[c];
        const ww = f(u[c] + kc);
        const p = Math.max(p0, ww);
        const e1 = f(Math.exp(f(p0 - p)));
        const e2 = f(Math.exp(f(ww - p)));
        const wkv = f(f(f(e1 * a0) + f(e2 * vc)) / f(f(e1 * b0) + e2));
        const ww2 = f(p0 + w[c]);
        const p2 = Math.max(ww2, kc);
        const e1b = f(Math.exp(f(ww2 - p2)));
        const e2b = f(Math.exp(f(kc - p2)));
        aa[c] = f(f(e1b * a0) + f(e2b * vc));
        bb[c] = f(f(e1b * b0) + e2b);
        pp[c] = p2;
        rw[c] = f(sigmoid(r[c]) * wkv);
      }
      this.quantize(C, 0);
      this.runJob(this.jobs[i].out);
      const att = this.outF[0];
      for (let c = 0; c < C; c++) x[c] = f(x[c] + att[c]);
      // channel mix: key (slot 0) and receptance (slot 1), then value (slot 2) of relu(key)^2
      this.layerNorm(x, ly.ln2w, ly.ln2b, xx);
      for (let m = 0; m < 2; m++) {
        const mix = ly.ffnMix.subarray(m * C, (m + 1) * C);
        const dst = xinF[m];
        for (let c = 0; c < C; c++) dst[c] = f(fx[c] + f(f(xx[c] - fx[c]) * mix[c]));
        this.quantize(C, m);
      }
      fx.set(xx);
      this.runJob(this.jobs[i].kr);
      const fk = this.outF[0];
      const fr = this.outF[1];
      const sq = xinF[2];
      for (let j = 0; j < F; j++) { const a = fk[j] > 0 ? fk[j] : 0; sq[j] = f(a * a); }
      this.quantize(F, 2);
      this.runJob(this.jobs[i].val);
      const fv = this.outF[2];
      for (let c = 0; c < C; c++) x[c] = f(x[c] + f(sigmoid(fr[c]) * fv[c]));
    }
    this.layerNorm(x, this.lnOutW, this.lnOutB, xinF[3]);
    this.quantize(C, 3);
    this.runJob(this.headJob);
    this.logits.set(this.outF[3].subarray(0, this.V));
    return this.logits;
  }

  dispose() {
    if (this.workers.length) {
      Atomics.store(this.i32, (CTL >> 2) + 3, 1); // quit
      // a change of the claim word (its job number, the high half) wakes a polling helper; notify a sleeping one
      Atomics.add(this.i32, (CTL >> 2) + 1, 1);
      Atomics.notify(new BigInt64Array(this.memory.buffer), CTL >> 3);
      for (const w of this.workers) w.terminate();
      this.workers = [];
    }
    this.memory = null;
  }
}

// runtimes.html's adapter (rt_common.js). backend 'wasm-native' picks the kernel itself; 'wasm-native-u8',
// 'wasm-native-nib', 'wasm-native-i16' force one (benchmarks/bench_web_runtimes.py times them); elementwise 'js'
// runs the JS reference step (benchmarks/bench_wasm_native.py's nativejs configs).
export async function open({ manifest, modelBase, graph, backend, threads = 1, verify = true, spin = SPIN,
  patience = PATIENCE, elementwise = 'wasm' }) {
  const mode = backend.startsWith(`${BACKEND}-`) ? backend.slice(BACKEND.length + 1) : null;
  if (backend !== BACKEND && !MODES.includes(mode)) fail(`wasm-native has no backend '${backend}' (has ${BACKEND})`);
  const why = unsupported(manifest, graph.variant);
  if (why) fail(why);
  const { files } = await fetchGraphFiles(manifest, modelBase, [graph], verify);
  const bytes = [...files.values()].reduce((n, b) => n + b.length, 0);
  const rt = await RwkvWasm.create(manifest, graph.variant, files, { threads, mode, spin, patience, elementwise });
  files.clear();
  return {
    backend: BACKEND, threads: rt.threads, bytes,
    notes: [`kernel ${rt.mode} (relaxed-dot probe ${rt.probe ? 'exact' : 'not exact'})`, `elementwise in ${rt.elementwise}`,
      'prompt as a loop of steps'],
    promptInfo: null, prompt: null,
    reset() { rt.reset(); },
    step: (id) => rt.step(id),
    stepJs: (id) => rt.stepJs(id), // the JS reference step on the same runtime (benchmarks/bench_wasm_native.py)
    wasmBytes: () => rt.bytes,
    async dispose() { rt.dispose(); },
  };
}
