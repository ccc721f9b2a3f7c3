// webgpu-native: a hand-written WebGPU runtime (WGSL compute shaders) for the RWKV-4 step of an export folder, no
// onnxruntime. Why: onnxruntime-web on WebGPU spends ~64 µs per ONNX node on an H200 (577 nodes at 169M: 26.7
// tok/s) while a bare dispatch costs ~9 µs there (README "WebGPU on a real GPU"), so a step must be a few fused
// dispatches, not hundreds of nodes.
//
// What it runs: the weights of a variant's step .onnx (fp32 model.onnx, or fp16 model_fp16.onnx with ChatRWKV's
// rescaling, arch/rwkv4/step.py), read by initializer name (the torch step module's parameter names: "emb",
// "layers.0.att_key", ...) with a minimal protobuf reader; the graph's nodes are not read: the kernels below are
// RWKV4Step.forward. Matrices stay as the file stores them ([in, out], fp32 or packed fp16 read as u32 and unpacked
// with unpack2x16float: the H200's adapter has no shader-f16); all arithmetic is f32.
//
// One token = one command buffer of 7 dispatches per layer + 3 (embedding; per layer LN1 + token-shift mix, the k/v/r
// matvec, WKV, output matvec + residual, LN2 + mix, FFN key + receptance, value + gate + residual; ln_out, head) and
// argmax on the GPU for greedy decoding. Greedy decoding does not wait for the GPU a token: the argmax leaves its id
// where the next step's embedding reads it, so DECODE_BATCH steps go into one command buffer, submitted back to back,
// and their ids come back in one small readback per batch (decodeGreedy); sampling (temperature > 0) reads the
// logits row back at every token and samples in JS (sampling.js). A prompt of T
// tokens runs the same dispatches with tiled matmuls over the T rows and the WKV as a loop over T in one thread per
// channel. The state lives in one GPU buffer. Every kernel binds at most 6 storage buffers (SwiftShader has ~8).
//
// nativeWorker() speaks worker.js's message protocol in the page, so main.js drives this runtime like the others.

import { checkFileName, float16BitsToFloat32, graphFiles, stepGraph } from './manifest.js';
import { checkParams, makeRng, sampleToken } from './sampling.js';

export const BACKEND = 'webgpu-native';
export const DECODE_BATCH = 16; // greedy steps a command buffer (decodeGreedy): the page sees ids every 16 tokens
export const MAX_DECODE_BATCH = 64;
export const PROMPT_CHUNK = 512; // tokens per prompt call (activation buffers are sized for it: ~8 MB at 169M)
const ADAPTER_TIMEOUT_MS = 5000;
const WG = 256; // threads per workgroup in every kernel
const STATE_NAMES = ['att_x', 'att_aa', 'att_bb', 'att_pp', 'ffn_x'];
const SUPPORTED = { fp32: 'float32', fp16: 'float16' }; // variant -> weight dtype

export class NativeError extends Error {}
const fail = (msg) => { throw new NativeError(msg); };

// ---- ONNX initializers: a minimal protobuf reader -------------------------------------------------------------

// Fields read (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2,
// name = 8, raw_data = 9, external_data = 13 (StringStringEntryProto key = 1, value = 2), data_location = 14.
class Pb {
  constructor(bytes, start = 0, end = bytes.length) {
    Object.assign(this, { b: bytes, i: start, end });
  }

  varint() {
    let x = 0;
    let mul = 1;
    for (;;) {
      if (this.i >= this.end) fail('the .onnx file is truncated (a protobuf varint runs past its end)');
      const byte = this.b[this.i++];
      x += (byte & 0x7f) * mul; // Numbers, not bit ops: offsets and lengths pass 2^31
      if (byte < 0x80) return x;
      mul *= 128;
    }
  }

  // Calls fn(field, wire, pb) for each field; fn reads the value or returns false to have it skipped.
  fields(fn) {
    while (this.i < this.end) {
      const key = this.varint();
      const field = Math.floor(key / 8);
      const wire = key & 7;
      if (fn(field, wire, this) !== false) continue;
      if (wire === 0) this.varint();
      else if (wire === 1) this.i += 8;
      else if (wire === 2) { const n = this.varint(); this.i += n; } // (not this.i += this.varint(): i is read first)
      else if (wire === 5) this.i += 4;
      else fail(`the .onnx file is not a valid protobuf (wire type ${wire})`);
    }
    if (this.i !== this.end) fail('the .onnx file is not a valid protobuf (a field runs past its message)');
  }

  sub() {
    const n = this.varint();
    const p = new Pb(this.b, this.i, this.i + n);
    if (p.end > this.end) fail('the .onnx file is truncated');
    this.i += n;
    return p;
  }

  bytes() {
    const p = this.sub();
    return this.b.subarray(p.i, p.end);
  }

  string() {
    return new TextDecoder().decode(this.bytes());
  }
}

function readTensor(p) {
  const t = { dims: [], dtype: 0, name: '', raw: null, external: {}, location: 0 };
  p.fields((f, wire, q) => {
    if (f === 1 && wire === 2) { const s = q.sub(); while (s.i < s.end) t.dims.push(s.varint()); } // packed
    else if (f === 1 && wire === 0) t.dims.push(q.varint());
    else if (f === 2 && wire === 0) t.dtype = q.varint();
    else if (f === 8 && wire === 2) t.name = q.string();
    else if (f === 9 && wire === 2) t.raw = q.bytes();
    else if (f === 13 && wire === 2) {
      let key = '';
      let value = '';
      q.sub().fields((g, w2, r) => {
        if (g === 1 && w2 === 2) key = r.string();
        else if (g === 2 && w2 === 2) value = r.string();
        else return false;
        return true;
      });
      t.external[key] = value;
    } else if (f === 14 && wire === 0) t.location = q.varint();
    else return false;
    return true;
  });
  return t;
}

// name -> {dims, dtype (TensorProto code), raw | external {location, offset, length}} for every initializer.
export function onnxInitializers(bytes) {
  const out = new Map();
  new Pb(bytes).fields((f, wire, p) => {
    if (f !== 7 || wire !== 2) return false;
    p.sub().fields((g, w2, q) => {
      if (g !== 5 || w2 !== 2) return false;
      const t = readTensor(q.sub());
      out.set(t.name, t);
      return true;
    });
    return true;
  });
  if (!out.size) fail('the .onnx file has no graph initializers (not an rwkv-export step graph?)');
  return out;
}

const DTYPE_CODES = { 1: 'float32', 10: 'float16' };

// The bytes of an initializer: inline raw_data or a slice of an external data file (files: Map name -> bytes).
function tensorBytes(t, graph, files) {
  if (t.location !== 1) {
    if (!t.raw) fail(`initializer ${t.name} has no raw_data (this runtime reads raw_data and external data only)`);
    return t.raw;
  }
  const dir = graph.file.includes('/') ? graph.file.slice(0, graph.file.lastIndexOf('/') + 1) : '';
  const file = checkFileName(dir + t.external.location, graph.file);
  const data = files.get(file);
  if (!data) fail(`initializer ${t.name} lives in ${file}, which the manifest does not list for ${graph.file}`);
  const offset = Number(t.external.offset ?? 0);
  const length = Number(t.external.length ?? data.length - offset);
  if (offset + length > data.length) fail(`${file} is too short for initializer ${t.name}: damaged or truncated`);
  return data.subarray(offset, offset + length);
}

// ---- what this runtime runs -----------------------------------------------------------------------------------

// One line for a folder/variant this runtime cannot run; null when it can.
export function unsupported(manifest, variant) {
  const d = manifest.model;
  if (String(d.rwkv_version) !== '4') return `webgpu-native runs RWKV-4 only; this model is RWKV-${d.rwkv_version} (use wasm or webgpu)`;
  if (!SUPPORTED[variant]) {
    return `webgpu-native runs the fp32 and fp16 variants only, not '${variant}' (use wasm or webgpu for it)`;
  }
  const names = manifest.state.tensors.map((t) => t.name);
  if (names.join() !== STATE_NAMES.join()) return `webgpu-native expects the RWKV-4 state ${STATE_NAMES.join(', ')}; the manifest has ${names.join(', ')}`;
  const C = d.n_embd;
  if (C % 64 || d.ffn_dim % 64) return `webgpu-native needs n_embd and ffn_dim divisible by 64 (has ${C}, ${d.ffn_dim})`;
  return null;
}

// ---- WGSL ---------------------------------------------------------------------------------------------------------

// Matrices: fp32 as array<vec4f> (4 outputs of one row), fp16 as array<vec2u> (the same 4 outputs, packed).
function wgslWeights(f16) {
  return f16
    ? `alias W4 = vec2u;
fn unpackW(u: vec2u) -> vec4f { return vec4f(unpack2x16float(u.x), unpack2x16float(u.y)); }`
    : `alias W4 = vec4f;
fn unpackW(u: vec4f) -> vec4f { return u; }`;
}

const RUN = 'struct Run { T: u32, p1: u32, p2: u32, p3: u32 }';

// Y[t, j] = epilogue(sum_k X[seg(j)][t, k] * W[k, j]); seg(j) = (j >= b1) + (j >= b2): one dispatch runs the k, v and r
// matvecs (W = [att_key | att_value | att_receptance] along the outputs, X = the three mixes stacked).
// act per segment: 0 none, 1 sigmoid, 2 relu squared, 3 Y = (Y + acc) * scale, 4 Y = (Y + X[t, gate + j] * acc) * scale.
const MATMUL_COMMON = `
struct P { K: u32, N: u32, Np: u32, b1: u32, b2: u32, xs: u32, xseg: u32, ys: u32,
           act0: u32, act1: u32, act2: u32, gate: u32, scale: f32, p13: u32, p14: u32, p15: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<W4>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

fn seg(j: u32) -> u32 { return select(0u, 1u, j >= p.b1) + select(0u, 1u, j >= p.b2); }

fn epi(t: u32, j: u32, acc: f32) {
  if (j >= p.N) { return; }
  let s = seg(j);
  let a = select(select(p.act0, p.act1, s == 1u), p.act2, s == 2u);
  let i = t * p.ys + j;
  switch a {
    case 1u: { Y[i] = 1.0 / (1.0 + exp(-acc)); }
    case 2u: { let r = max(acc, 0.0); Y[i] = r * r; }
    case 3u: { Y[i] = (Y[i] + acc) * p.scale; }
    case 4u: { Y[i] = (Y[i] + X[t * p.xs + p.gate + j] * acc) * p.scale; }
    default: { Y[i] = acc; }
  }
}
`;

// One token: a workgroup per 32 outputs, 8 lanes of 4 outputs x 32 slices of the inner dimension (a slice's 8 lanes
// read 128 contiguous bytes of a row), the slices summed in shared memory. Four rows per iteration, into four
// accumulators, so that each thread has four loads in flight (a workgroup of the 768 x 768 matvecs covers 1/24 of it).
const MATVEC = `
var<workgroup> part: array<vec4f, ${WG}>;
@compute @workgroup_size(8, 32)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let j = (wg.x * 8u + l.x) * 4u;
  let xb = seg(wg.x * 32u) * p.xseg;
  let row = p.Np / 4u;
  let c = j / 4u;
  var a0 = vec4f(0.0);
  var a1 = vec4f(0.0);
  var a2 = vec4f(0.0);
  var a3 = vec4f(0.0);
  if (j < p.Np) {
    var k = l.y;
    for (; k + 96u < p.K; k += 128u) {
      a0 += X[xb + k] * unpackW(W[k * row + c]);
      a1 += X[xb + k + 32u] * unpackW(W[(k + 32u) * row + c]);
      a2 += X[xb + k + 64u] * unpackW(W[(k + 64u) * row + c]);
      a3 += X[xb + k + 96u] * unpackW(W[(k + 96u) * row + c]);
    }
    for (; k < p.K; k += 32u) { a0 += X[xb + k] * unpackW(W[k * row + c]); }
  }
  let li = l.y * 8u + l.x;
  part[li] = (a0 + a1) + (a2 + a3);
  workgroupBarrier();
  for (var h = 16u; h > 0u; h >>= 1u) {
    if (l.y < h) { part[li] += part[li + h * 8u]; }
    workgroupBarrier();
  }
  if (l.y == 0u) {
    let r = part[l.x];
    epi(0u, j, r.x); epi(0u, j + 1u, r.y); epi(0u, j + 2u, r.z); epi(0u, j + 3u, r.w);
  }
}
`;

// T tokens: 64 x 64 output tiles, 16 x 16 threads of 4 x 4 outputs, the inner dimension in steps of 16 through shared
// memory (each weight tile is read once per 64 tokens).
const GEMM = `
var<workgroup> xt: array<f32, 1024>; // [k][t] of the tile
var<workgroup> wt: array<f32, 1024>; // [k][j]
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let j0 = wg.x * 64u;
  let t0 = wg.y * 64u;
  let xb = seg(j0) * p.xseg;
  let tid = l.y * 16u + l.x;
  let row = p.Np / 4u;
  var acc: array<vec4f, 4>;
  for (var k0 = 0u; k0 < p.K; k0 += 16u) {
    let m = tid / 4u;
    let kq = (tid % 4u) * 4u;
    let t = t0 + m;
    for (var q = 0u; q < 4u; q++) {
      xt[(kq + q) * 64u + m] = select(0.0, X[xb + t * p.xs + k0 + kq + q], t < run.T);
    }
    let kr = tid / 16u;
    let n4 = tid % 16u;
    var w = vec4f(0.0);
    if (j0 + n4 * 4u < p.Np) { w = unpackW(W[(k0 + kr) * row + j0 / 4u + n4]); }
    wt[kr * 64u + n4 * 4u] = w.x; wt[kr * 64u + n4 * 4u + 1u] = w.y;
    wt[kr * 64u + n4 * 4u + 2u] = w.z; wt[kr * 64u + n4 * 4u + 3u] = w.w;
    workgroupBarrier();
    for (var kk = 0u; kk < 16u; kk++) {
      let b = vec4f(wt[kk * 64u + l.x * 4u], wt[kk * 64u + l.x * 4u + 1u], wt[kk * 64u + l.x * 4u + 2u], wt[kk * 64u + l.x * 4u + 3u]);
      for (var i = 0u; i < 4u; i++) { acc[i] += xt[kk * 64u + l.y * 4u + i] * b; }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let t = t0 + l.y * 4u + i;
    if (t < run.T) {
      let j = j0 + l.x * 4u;
      epi(t, j, acc[i].x); epi(t, j + 1u, acc[i].y); epi(t, j + 2u, acc[i].z); epi(t, j + 3u, acc[i].w);
    }
  }
}
`;

// x[t] = emb[ids[t]] (LN0 is folded into emb at export)
function wgslEmbed(f16) {
  return `
struct P { C: u32, p1: u32, p2: u32, p3: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> E: array<${f16 ? 'u32' : 'f32'}>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  if (g.x >= run.T * p.C) { return; }
  let t = g.x / p.C;
  let e = ids[t] * p.C + g.x % p.C;
  ${f16 ? 'x[g.x] = unpack2x16float(E[e / 2u])[e % 2u];' : 'x[g.x] = E[e];'}
}`;
}

// LayerNorm of x's rows and the token-shift mixes: out[m][t] = prev + (xx - prev) * mix[m], prev = xx of the token
// before (row t-1, recomputed here; the state's row for t = 0). Workgroup t; workgroup 0 reads the shift state and
// then writes xx of the last token into it. nmix = 0: out[0] = xx of the last row only (ln_out before the head).
const LN_MIX = `
struct P { C: u32, nmix: u32, sidx: u32, oseg: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read_write> S: array<f32>;
@group(0) @binding(4) var<storage, read> lw: array<f32>;
@group(0) @binding(5) var<storage, read> lb: array<f32>;
@group(0) @binding(6) var<storage, read> mix: array<f32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;
var<workgroup> red: array<f32, ${WG}>;

fn wsum(v: f32, li: u32) -> f32 {
  red[li] = v;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h >>= 1u) {
    if (li < h) { red[li] += red[li + h]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

fn stats(row: u32, li: u32) -> vec2f { // mean, 1/std (two passes, as LayerNormalization)
  var s = 0.0;
  for (var c = li; c < p.C; c += ${WG}u) { s += X[row * p.C + c]; }
  let mean = wsum(s, li) / f32(p.C);
  var q = 0.0;
  for (var c = li; c < p.C; c += ${WG}u) { let d = X[row * p.C + c] - mean; q += d * d; }
  return vec2f(mean, 1.0 / sqrt(wsum(q, li) / f32(p.C) + 1e-5));
}

fn ln(row: u32, c: u32, st: vec2f) -> f32 { return (X[row * p.C + c] - st.x) * st.y * lw[c] + lb[c]; }

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let last = run.T - 1u;
  if (p.nmix == 0u) {
    let st = stats(last, li);
    for (var c = li; c < p.C; c += ${WG}u) { O[c] = ln(last, c, st); }
    return;
  }
  let t = wg.x;
  let st = stats(t, li);
  var sp = vec2f(0.0);
  if (t > 0u) { sp = stats(t - 1u, li); }
  var sl = st;
  if (t == 0u && last > 0u) { sl = stats(last, li); }
  for (var c = li; c < p.C; c += ${WG}u) {
    let xx = ln(t, c, st);
    var prev: f32;
    if (t == 0u) { prev = S[p.sidx + c]; } else { prev = ln(t - 1u, c, sp); }
    for (var m = 0u; m < p.nmix; m++) { O[m * p.oseg + t * p.C + c] = prev + (xx - prev) * mix[m * p.C + c]; }
    if (t == 0u) { S[p.sidx + c] = ln(last, c, sl); }
  }
}
`;

// WKV (RWKV4Step's time_mix after the matvecs): one thread per channel, a loop over the T tokens; out = r * wkv.
const WKV = `
struct P { C: u32, a: u32, b: u32, pp: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> KVR: array<f32>;
@group(0) @binding(3) var<storage, read_write> S: array<f32>;
@group(0) @binding(4) var<storage, read> first: array<f32>;
@group(0) @binding(5) var<storage, read> decay: array<f32>;
@group(0) @binding(6) var<storage, read_write> O: array<f32>;
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let c = g.x;
  if (c >= p.C) { return; }
  var aa = S[p.a + c];
  var bb = S[p.b + c];
  var pp = S[p.pp + c];
  let u = first[c];
  let w = decay[c];
  for (var t = 0u; t < run.T; t++) {
    let row = t * 3u * p.C;
    let k = KVR[row + c];
    let v = KVR[row + p.C + c];
    let r = KVR[row + 2u * p.C + c];
    var ww = u + k;
    var q = max(pp, ww);
    var e1 = exp(pp - q);
    var e2 = exp(ww - q);
    O[t * p.C + c] = r * (e1 * aa + e2 * v) / (e1 * bb + e2);
    ww = pp + w;
    q = max(ww, k);
    e1 = exp(ww - q);
    e2 = exp(k - q);
    aa = e1 * aa + e2 * v;
    bb = e1 * bb + e2;
    pp = q;
  }
  S[p.a + c] = aa;
  S[p.b + c] = bb;
  S[p.pp + c] = pp;
}
`;

// Greedy decoding's argmax on the GPU (the first index of the largest logit, as sampling.js argmax). The id goes to
// ids[0], where the next step's embedding reads it (so greedy steps chain on the GPU, decodeGreedy), and is appended
// to gen = [count, id, id, ...] (up to p.cap ids; decodeGreedy clears it before each batch and reads it back).
const ARGMAX = `
struct P { V: u32, cap: u32, p2: u32, p3: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> L: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> gen: array<u32>;
var<workgroup> bv: array<f32, ${WG}>;
var<workgroup> bi: array<u32, ${WG}>;
@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) li: u32) {
  var v = L[0];
  var i = 0u;
  for (var j = li; j < p.V; j += ${WG}u) { if (L[j] > v) { v = L[j]; i = j; } }
  bv[li] = v;
  bi[li] = i;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h >>= 1u) {
    if (li < h) {
      let ov = bv[li + h];
      let oi = bi[li + h];
      if (ov > bv[li] || (ov == bv[li] && oi < bi[li])) { bv[li] = ov; bi[li] = oi; }
    }
    workgroupBarrier();
  }
  if (li == 0u) {
    ids[0] = bi[0];
    let n = gen[0];
    if (n < p.cap) { gen[1u + n] = bi[0]; gen[0] = n + 1u; }
  }
}
`;

// ---- the runtime --------------------------------------------------------------------------------------------------

// GPUBufferUsage's values (fixed by the spec): importing this module needs no WebGPU
const U = { MAP_READ: 0x1, COPY_SRC: 0x4, COPY_DST: 0x8, UNIFORM: 0x40, STORAGE: 0x80 };
const align = (n, a) => Math.ceil(n / a) * a;

// Get a WebGPU device with the adapter's buffer limits (a 169M head is 154 MB fp32: over the default 128 MiB binding).
export async function requestDevice() {
  if (!globalThis.navigator?.gpu) fail('webgpu-native needs WebGPU, and this browser has none (navigator.gpu is missing); choose wasm');
  const adapter = await Promise.race([
    navigator.gpu.requestAdapter({ powerPreference: 'high-performance' }),
    new Promise((resolve) => setTimeout(() => resolve('timeout'), ADAPTER_TIMEOUT_MS)),
  ]);
  if (adapter === 'timeout') fail('webgpu-native: requestAdapter() did not answer; choose wasm');
  if (!adapter) fail('webgpu-native needs a WebGPU adapter and navigator.gpu.requestAdapter() found none; choose wasm');
  const { maxStorageBufferBindingSize, maxBufferSize } = adapter.limits;
  const device = await adapter.requestDevice({ requiredLimits: { maxStorageBufferBindingSize, maxBufferSize } });
  const info = adapter.info || {};
  return { device, adapterName: [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(' / ') };
}

export class RwkvWebGPU {
  // device: a GPUDevice; files: Map file name -> bytes holding the graph's .onnx and its data files.
  constructor(device, manifest, variant, files) {
    const why = unsupported(manifest, variant);
    if (why) fail(why);
    const graph = stepGraph(manifest, variant);
    const d = manifest.model;
    const L = d.n_layer;
    const C = d.n_embd;
    const F = d.ffn_dim;
    const V = d.vocab_size;
    Object.assign(this, { device, manifest, variant, graph, L, C, F, V, buffers: [] });
    const onnx = files.get(graph.file);
    if (!onnx) fail(`${graph.file} was not downloaded`);
    const inits = onnxInitializers(onnx);
    const wdtype = SUPPORTED[variant];
    this.f16 = wdtype === 'float16';
    const every = graph.quantization?.rescale_every ?? 0;
    const tensor = (name, dims) => {
      const t = inits.get(name);
      if (!t) fail(`${graph.file} has no initializer '${name}': not an rwkv-export RWKV-4 step graph of this version`);
      if (JSON.stringify(t.dims) !== JSON.stringify(dims)) fail(`${graph.file}: ${name} has shape ${JSON.stringify(t.dims)}, expected ${JSON.stringify(dims)}`);
      if (!DTYPE_CODES[t.dtype]) fail(`${graph.file}: ${name} has ONNX data type ${t.dtype}; webgpu-native reads float32 and float16`);
      return { ...t, dtype: DTYPE_CODES[t.dtype], bytes: tensorBytes(t, graph, files) };
    };
    const matrix = (names, K, widths) => this.matrixBuffer(names.map((n, i) => tensor(n, [K, widths[i]])), wdtype, K);
    const vector = (name, dims) => this.upload(toF32(tensor(name, dims)), U.STORAGE, name);

    this.emb = this.upload(weightBytes(tensor('emb', [V, C]), wdtype), U.STORAGE, 'emb');
    this.layers = [];
    for (let i = 0; i < L; i++) {
      const p = `layers.${i}.`;
      this.layers.push({
        ln1w: vector(`${p}ln1_w`, [C]), ln1b: vector(`${p}ln1_b`, [C]), attMix: vector(`${p}att_mix`, [3, C]),
        first: vector(`${p}att_first`, [C]), decay: vector(`${p}att_decay`, [C]),
        kvr: matrix([`${p}att_key`, `${p}att_value`, `${p}att_receptance`], C, [C, C, C]),
        out: matrix([`${p}att_output`], C, [C]),
        ln2w: vector(`${p}ln2_w`, [C]), ln2b: vector(`${p}ln2_b`, [C]), ffnMix: vector(`${p}ffn_mix`, [2, C]),
        kr: matrix([`${p}ffn_key`, `${p}ffn_receptance`], C, [F, C]),
        val: matrix([`${p}ffn_value`], F, [C]),
        scale: every && (i + 1) % every === 0 ? 0.5 : 1.0, // fp16: x / 2 every `every` layers (step.py)
      });
    }
    this.lnOutW = vector('ln_out_w', [C]);
    this.lnOutB = vector('ln_out_b', [C]);
    this.head = matrix(['head'], C, [V]);

    // state [5][L][C] in manifest order; activations for up to PROMPT_CHUNK tokens
    const T = PROMPT_CHUNK;
    this.stateInit = new Float32Array(5 * L * C);
    manifest.state.tensors.forEach((s, k) => this.stateInit.fill(s.init, k * L * C, (k + 1) * L * C));
    this.state = this.buffer(this.stateInit.byteLength, U.STORAGE | U.COPY_DST | U.COPY_SRC, 'state');
    this.ids = this.buffer(4 * T, U.STORAGE | U.COPY_DST | U.COPY_SRC, 'ids');
    this.run = this.buffer(16, U.UNIFORM | U.COPY_DST, 'run');
    this.x = this.buffer(4 * T * C, U.STORAGE, 'x');
    this.mixed = this.buffer(4 * 3 * T * C, U.STORAGE, 'mixed');
    this.big = this.buffer(4 * T * Math.max(3 * C, F + C), U.STORAGE, 'kvr / ffn k,r');
    this.rwkv = this.buffer(4 * T * C, U.STORAGE, 'r*wkv');
    this.h = this.buffer(4 * C, U.STORAGE, 'ln_out');
    this.logits = this.buffer(4 * align(V, 4), U.STORAGE | U.COPY_SRC, 'logits');
    this.gen = this.buffer(4 * (1 + MAX_DECODE_BATCH), U.STORAGE | U.COPY_DST | U.COPY_SRC, 'generated ids');
    // two readbacks of gen, used alternately: batch b + 1 runs on the GPU while JS reads batch b
    this.genRead = [0, 1].map((i) => this.buffer(4 * (1 + MAX_DECODE_BATCH), U.MAP_READ | U.COPY_DST, `generated ids readback ${i}`));
    this.logitsRead = this.buffer(4 * V, U.MAP_READ | U.COPY_DST, 'logits readback');
    this.idRead = this.buffer(4, U.MAP_READ | U.COPY_DST, 'argmax readback');
    this.bytes = this.stateInit.byteLength;
    this.build();
  }

  buffer(size, usage, label) {
    const b = this.device.createBuffer({ size: align(Math.max(size, 16), 16), usage, label });
    this.buffers.push(b);
    return b;
  }

  upload(bytes, usage, label) {
    const b = this.buffer(bytes.byteLength, usage | U.COPY_DST, label);
    this.device.queue.writeBuffer(b, 0, bytes.buffer, bytes.byteOffset, bytes.byteLength); // (every size here is a multiple of 4 bytes)
    return b;
  }

  // [K, sum(widths)] in the weight dtype: the tensors side by side along the outputs, each row padded to a multiple
  // of 4 outputs (the kernels read 4 at a time; the head's 50277 is odd). {buffer, N, Np, bounds}.
  matrixBuffer(tensors, wdtype, K) {
    const widths = tensors.map((t) => t.dims[1]);
    const N = widths.reduce((a, b) => a + b, 0);
    const Np = align(N, 4);
    const eb = wdtype === 'float16' ? 2 : 4;
    const parts = tensors.map((t) => weightBytes(t, wdtype));
    let bytes;
    if (parts.length === 1 && Np === N) bytes = parts[0];
    else {
      bytes = new Uint8Array(K * Np * eb);
      for (let k = 0; k < K; k++) {
        let at = k * Np * eb;
        for (const [i, part] of parts.entries()) {
          const w = widths[i] * eb;
          bytes.set(part.subarray(k * w, (k + 1) * w), at);
          at += w;
        }
      }
    }
    const bounds = [widths[0], widths[0] + (widths[1] ?? 0)];
    return { buffer: this.upload(bytes, U.STORAGE, tensors.map((t) => t.name).join('|')), N, Np, bounds, K };
  }

  // Pipelines, uniforms and bind groups of every dispatch, once: a step only encodes them.
  build() {
    const dev = this.device;
    const { L, C, F, V } = this;
    const Tmax = PROMPT_CHUNK;
    const w = wgslWeights(this.f16);
    const layoutOf = (kinds) => dev.createBindGroupLayout({
      entries: [...kinds].map((k, binding) => ({
        binding, visibility: 4, // GPUShaderStage.COMPUTE
        buffer: { type: { u: 'uniform', r: 'read-only-storage', w: 'storage' }[k] },
      })),
    });
    const pipe = (code, layout, label) => dev.createComputePipeline({
      label, layout: dev.createPipelineLayout({ bindGroupLayouts: [layout] }),
      compute: { module: dev.createShaderModule({ code, label }), entryPoint: 'main' },
    });
    const lay = {
      embed: layoutOf('uurrw'), mm: layoutOf('uurrw'), ln: layoutOf('uurwrrrw'), wkv: layoutOf('uurwrrw'), am: layoutOf('urww'),
    };
    this.pipes = {
      embed: pipe(wgslEmbed(this.f16), lay.embed, 'embed'),
      matvec: pipe(w + MATMUL_COMMON + MATVEC, lay.mm, 'matvec'),
      gemm: pipe(w + MATMUL_COMMON + GEMM, lay.mm, 'gemm'),
      ln: pipe(LN_MIX, lay.ln, 'ln+mix'),
      wkv: pipe(WKV, lay.wkv, 'wkv'),
      argmax: pipe(ARGMAX, lay.am, 'argmax'),
    };
    const uniform = (words) => {
      const a = new ArrayBuffer(64);
      const u = new Uint32Array(a);
      const f = new Float32Array(a);
      words.forEach((v, i) => { if (typeof v === 'object') f[i] = v.f; else u[i] = v; });
      return this.upload(new Uint8Array(a), U.UNIFORM, 'params');
    };
    const group = (layout, buffers) => dev.createBindGroup({
      layout, entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
    });
    // ops: {group, at(T) -> [pipeline, workgroups x, y]}: the grid follows the call's token count T
    const ops = [];
    const embed = group(lay.embed, [uniform([C]), this.run, this.ids, this.emb, this.x]);
    ops.push({ kind: 'embed', group: embed, at: (T) => ['embed', Math.ceil((T * C) / WG), 1] });
    // a matmul: one token through the matvec, T tokens through the tiled kernel; the head always takes one row
    const mm = (X, Wm, Y, { xs, xseg = 0, ys, acts, gate = 0, scale = 1, oneRow = false }) => {
      const p = uniform([Wm.K, Wm.N, Wm.Np, Wm.bounds[0], Wm.bounds[1], xs, xseg, ys, ...acts, gate, { f: scale }]);
      return {
        group: group(lay.mm, [p, this.run, X, Wm.buffer, Y]),
        at: (T) => (T === 1 || oneRow ? ['matvec', Math.ceil(Wm.Np / 32), 1] : ['gemm', Math.ceil(Wm.Np / 64), Math.ceil(T / 64)]),
      };
    };
    const lnMix = (sIndex, i, lw, lb, mix, nmix) => {
      const p = uniform([C, nmix, (sIndex * L + i) * C, Tmax * C]);
      return { group: group(lay.ln, [p, this.run, this.x, this.state, lw, lb, mix, this.mixed]), at: (T) => ['ln', T, 1] };
    };
    const wkv = (i, ly) => {
      const p = uniform([C, (1 * L + i) * C, (2 * L + i) * C, (3 * L + i) * C]); // att_aa, att_bb, att_pp rows
      return { group: group(lay.wkv, [p, this.run, this.big, this.state, ly.first, ly.decay, this.rwkv]), at: () => ['wkv', Math.ceil(C / WG), 1] };
    };
    for (const [i, ly] of this.layers.entries()) {
      const kind = (k, op) => Object.assign(op, { kind: k });
      ops.push(kind('ln1+mix', lnMix(0, i, ly.ln1w, ly.ln1b, ly.attMix, 3)));
      ops.push(kind('att k/v/r', mm(this.mixed, ly.kvr, this.big, { xs: C, xseg: Tmax * C, ys: 3 * C, acts: [0, 0, 1] })));
      ops.push(kind('wkv', wkv(i, ly)));
      ops.push(kind('att out', mm(this.rwkv, ly.out, this.x, { xs: C, ys: C, acts: [3, 3, 3] })));
      ops.push(kind('ln2+mix', lnMix(4, i, ly.ln2w, ly.ln2b, ly.ffnMix, 2)));
      ops.push(kind('ffn k/r', mm(this.mixed, ly.kr, this.big, { xs: C, xseg: Tmax * C, ys: F + C, acts: [2, 1, 1] })));
      ops.push(kind('ffn v', mm(this.big, ly.val, this.x, { xs: F + C, ys: C, acts: [4, 4, 4], gate: F, scale: ly.scale })));
    }
    // ln_out of the last token (the mix input is unused with nmix = 0), then the head
    const last = group(lay.ln, [uniform([C, 0, 0, 0]), this.run, this.x, this.state, this.lnOutW, this.lnOutB, this.lnOutW, this.h]);
    ops.push({ kind: 'ln_out', group: last, at: () => ['ln', 1, 1] });
    ops.push({ kind: 'head', ...mm(this.h, this.head, this.logits, { xs: C, ys: 0, acts: [0, 0, 0], oneRow: true }) });
    this.ops = ops;
    this.argmaxOp = { kind: 'argmax', group: group(lay.am, [uniform([V, MAX_DECODE_BATCH]), this.logits, this.ids, this.gen]), at: () => ['argmax', 1, 1] };
    this.dispatchesPerStep = ops.length + 1;
  }

  reset() {
    this.device.queue.writeBuffer(this.state, 0, this.stateInit);
  }

  // Runs tokens `ids` (1..PROMPT_CHUNK) from the current state; want: 'argmax' -> the greedy id, 'logits' -> the last
  // token's logits (Float32Array), null -> nothing read back.
  async forward(ids, want) {
    const T = ids.length;
    if (T < 1 || T > PROMPT_CHUNK) fail(`forward takes 1 to ${PROMPT_CHUNK} tokens, got ${T}`);
    const q = this.device.queue;
    q.writeBuffer(this.ids, 0, Uint32Array.from(ids));
    q.writeBuffer(this.run, 0, new Uint32Array([T, 0, 0, 0]));
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    this.encode(pass, want === 'argmax' ? [...this.ops, this.argmaxOp] : this.ops, T);
    pass.end();
    if (want === 'argmax') enc.copyBufferToBuffer(this.ids, 0, this.idRead, 0, 4);
    else if (want === 'logits') enc.copyBufferToBuffer(this.logits, 0, this.logitsRead, 0, 4 * this.V);
    q.submit([enc.finish()]);
    if (!want) return null;
    const rb = want === 'argmax' ? this.idRead : this.logitsRead;
    await rb.mapAsync(1); // GPUMapMode.READ
    const mapped = rb.getMappedRange();
    const out = want === 'argmax' ? new Uint32Array(mapped)[0] : new Float32Array(mapped.slice(0));
    rb.unmap();
    return out;
  }

  encode(pass, ops, T) {
    for (const op of ops) {
      const [pipeline, x, y] = op.at(T);
      pass.setPipeline(this.pipes[pipeline]);
      pass.setBindGroup(0, op.group);
      pass.dispatchWorkgroups(x, y);
    }
  }

  // Greedy decoding without a round trip a token: n steps, each embedding the id that the argmax before it left in
  // ids[0] (so the call before must be forward(..., 'argmax')), encoded `batch` steps to a command buffer and submitted
  // back to back; each batch's ids come back through one small readback while the next batch runs (two in flight).
  // The batches add up to n exactly: the state takes n tokens, as n forward([id], 'argmax') calls would. onIds(ids of
  // one batch, in order) is called as they arrive and returns true to stop (the batch in flight is then waited for and
  // dropped: the state may be up to one batch ahead of the ids taken).
  async decodeGreedy(n, batch, onIds) {
    if (!(Number.isInteger(batch) && batch >= 1 && batch <= MAX_DECODE_BATCH)) fail(`the decode batch must be 1 to ${MAX_DECODE_BATCH}, got ${batch}`);
    const sizes = [];
    for (let left = n; left > 0; left -= batch) sizes.push(Math.min(batch, left));
    const q = this.device.queue;
    q.writeBuffer(this.run, 0, new Uint32Array([1, 0, 0, 0]));
    const steps = [...this.ops, this.argmaxOp];
    const submit = (b) => {
      const k = sizes[b];
      const rb = this.genRead[b % 2];
      const enc = this.device.createCommandEncoder();
      enc.clearBuffer(this.gen, 0, 16);
      const pass = enc.beginComputePass();
      for (let i = 0; i < k; i++) this.encode(pass, steps, 1);
      pass.end();
      enc.copyBufferToBuffer(this.gen, 0, rb, 0, 4 * (1 + k));
      q.submit([enc.finish()]);
      return { k, rb, mapped: rb.mapAsync(1, 0, 4 * (1 + k)) }; // GPUMapMode.READ
    };
    const inFlight = sizes.slice(0, 2).map((_, b) => submit(b));
    let stop = false;
    for (let b = 0; inFlight.length; b++) {
      const { k, rb, mapped } = inFlight.shift();
      await mapped;
      const words = new Uint32Array(rb.getMappedRange(0, 4 * (1 + k))).slice();
      rb.unmap();
      if (words[0] !== k) fail(`a decode batch of ${k} steps wrote ${words[0]} ids (GPU error?)`);
      if (!stop) stop = onIds(Array.from(words.subarray(1))) === true;
      if (!stop && b + 2 < sizes.length) inFlight.push(submit(b + 2)); // batch b + 1 keeps the GPU busy meanwhile
    }
  }

  // Where a decode token's time goes (load option profile): the dispatches of each kernel kind of one token, repeated
  // `repeats` times in one command buffer, timed from submit to onSubmittedWorkDone. Wall time rather than
  // timestamp-query: Chromium rounds timestamps to 100 µs without a developer flag, and a dispatch's fixed cost (~8 µs
  // on the H200) is part of a token's time anyway. 'token' times the whole step the same way, 'empty' a command buffer
  // with no dispatch (the submit's share, in every row). The repeated kernels leave garbage in the state: reset().
  async profile(repeats = 20) {
    this.device.queue.writeBuffer(this.run, 0, new Uint32Array([1, 0, 0, 0]));
    const time = async (ops) => {
      const once = async (r) => {
        const enc = this.device.createCommandEncoder();
        const pass = enc.beginComputePass();
        for (let i = 0; i < r; i++) this.encode(pass, ops, 1);
        pass.end();
        const t = performance.now();
        this.device.queue.submit([enc.finish()]);
        await this.device.queue.onSubmittedWorkDone();
        return performance.now() - t;
      };
      await once(1);
      return Math.round((1000 * (await once(repeats))) / repeats);
    };
    const steps = [...this.ops, this.argmaxOp];
    const out = { repeats, token_us: await time(steps), empty_us: await time([]), kinds: {} };
    for (const k of new Set(steps.map((op) => op.kind))) {
      const ops = steps.filter((op) => op.kind === k);
      out.kinds[k] = { dispatches: ops.length, us: await time(ops) };
    }
    return out;
  }

  // The prompt in PROMPT_CHUNK-token calls; only the last call reads back.
  async prompt(ids, want) {
    let out = null;
    for (let i = 0; i < ids.length; i += PROMPT_CHUNK) {
      out = await this.forward(ids.slice(i, i + PROMPT_CHUNK), i + PROMPT_CHUNK >= ids.length ? want : null);
    }
    return out;
  }

  destroy() {
    for (const b of this.buffers) b.destroy();
    this.buffers = [];
  }
}

// A tensor's bytes in the weight dtype: fp32 or packed fp16, as the variant stores its matrices.
function weightBytes(t, wdtype) {
  if (t.dtype !== wdtype) fail(`${t.name} is ${t.dtype}; the ${wdtype} variant's matrices must all be ${wdtype}`);
  return t.bytes;
}

// A small tensor (LayerNorm weights, mixes, decay, first) as f32.
function toF32(t) {
  if (t.dtype === 'float32') return new Uint8Array(t.bytes.slice().buffer);
  const h = new Uint16Array(t.bytes.slice().buffer);
  return new Uint8Array(Float32Array.from(h, float16BitsToFloat32).buffer);
}

// ---- the demo's worker protocol, in the page ----------------------------------------------------------------------

// Lets queued events (Stop) be handled between tokens.
function yieldToEvents() {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => { ch.port1.close(); resolve(); };
    ch.port2.postMessage(0);
  });
}

async function download(url, size, onBytes) {
  let res;
  try {
    res = await fetch(url, { cache: 'no-cache' });
  } catch (e) {
    fail(`cannot fetch ${url}: ${e.message}`);
  }
  if (!res.ok) fail(`${url}: HTTP ${res.status} ${res.statusText}`);
  const chunks = [];
  let n = 0;
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    n += value.length;
    onBytes(value.length);
  }
  if (size != null && n !== size) fail(`${url} has ${n} bytes but the manifest lists ${size}: damaged or truncated`);
  const buf = new Uint8Array(n);
  let at = 0;
  for (const c of chunks) { buf.set(c, at); at += c.length; }
  return buf;
}

const hex = (digest) => Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');

// The graph's files (size, and sha256 when verify), with worker.js-style progress messages through post.
async function fetchGraph(manifest, modelBase, graph, verify, post = () => {}) {
  const files = graphFiles(manifest, graph);
  const total = files.every((f) => f.size != null) ? files.reduce((a, f) => a + f.size, 0) : null;
  let loaded = 0;
  let verifyMs = 0;
  const bytes = new Map();
  const t0 = performance.now();
  for (const f of files) {
    const report = () => post({ type: 'progress', phase: 'download', file: f.file, loaded, total, seconds: (performance.now() - t0) / 1000 });
    report();
    const data = await download(new URL(f.file, modelBase).href, f.size, (k) => { loaded += k; report(); });
    if (verify && f.sha256 && globalThis.crypto?.subtle) {
      post({ type: 'progress', phase: 'verify', file: f.file });
      const tv = performance.now();
      const got = hex(await crypto.subtle.digest('SHA-256', data));
      verifyMs += performance.now() - tv;
      if (got !== f.sha256) fail(`${f.file} does not match the manifest (sha256 ${got.slice(0, 12)}… ≠ ${f.sha256.slice(0, 12)}…): damaged or edited`);
    }
    bytes.set(f.file, data);
  }
  return { bytes, loaded, verifyMs, downloadSeconds: (performance.now() - t0 - verifyMs) / 1000 };
}

// runtimes.html's adapter interface (rt_common.js): a runner over this runtime, logits read back at every call.
export async function open({ manifest, modelBase, graph, verify }) {
  const why = unsupported(manifest, graph.variant);
  if (why) fail(why);
  const { device, adapterName } = await requestDevice();
  const { bytes, loaded } = await fetchGraph(manifest, modelBase, graph, verify);
  const rt = new RwkvWebGPU(device, manifest, graph.variant, bytes);
  return {
    backend: BACKEND, threads: null, bytes: loaded, notes: [`${rt.dispatchesPerStep - 1} dispatches a token on ${adapterName}`],
    promptInfo: { graph: 'batched WGSL kernels', chunk: PROMPT_CHUNK, fixed: false },
    reset: () => rt.reset(),
    step: (id) => rt.forward([id], 'logits'),
    prompt: (ids) => rt.prompt(ids, 'logits'),
    wasmBytes: () => null,
    dispose() { rt.destroy(); device.destroy(); },
  };
}

// An object like worker.js's Worker (postMessage in, onmessage out, terminate), running this runtime in the page:
// the GPU does the work, so the page's thread only encodes ~90 dispatches a token.
export function nativeWorker() {
  let rt = null;
  let device = null;
  let stopRequested = false;
  let busy = false;
  const w = { onmessage: null, onerror: null };
  const post = (data) => w.onmessage?.({ data });

  async function load(msg) {
    const t0 = performance.now();
    const { manifest, variant, modelBase, verify } = msg;
    const why = unsupported(manifest, variant);
    if (why) fail(why);
    const b = w.decodeBatch;
    if (!(Number.isInteger(b) && b >= 1 && b <= MAX_DECODE_BATCH)) fail(`the decode batch must be an integer from 1 (a round trip a token) to ${MAX_DECODE_BATCH}, got ${b}`);
    post({ type: 'progress', phase: 'probe' });
    const dev = await requestDevice();
    device = dev.device;
    const graph = stepGraph(manifest, variant);
    const { bytes, loaded, downloadSeconds, verifyMs } = await fetchGraph(manifest, modelBase, graph, verify, post);
    post({ type: 'progress', phase: 'kernels' });
    const tS = performance.now();
    const checked = async (what, fn) => {
      device.pushErrorScope('validation');
      const r = await fn();
      const err = await device.popErrorScope();
      if (err) fail(`${what} failed on this adapter: ${err.message.split('\n')[0]}`);
      return r;
    };
    rt = await checked('building the WGSL kernels', () => new RwkvWebGPU(device, manifest, variant, bytes));
    await device.queue.onSubmittedWorkDone();
    const sessionSeconds = (performance.now() - tS) / 1000;
    post({ type: 'progress', phase: 'warmup' });
    const tW = performance.now();
    await checked('the first run', async () => {
      rt.reset();
      await rt.forward([0, 0], null); // the prompt kernels once, then a step: pipelines are built on first use
      await rt.forward([0], 'argmax');
    });
    const warmupSeconds = (performance.now() - tW) / 1000;
    const profile = msg.profile ? await checked('the profile run', () => rt.profile()) : null;
    rt.reset();
    post({
      type: 'loaded',
      info: {
        variant, backend: BACKEND, io: 'native', numThreads: null, file: graph.file,
        sequence: msg.useSequence ? `batched kernels (≤ ${PROMPT_CHUNK} tokens a call)` : null,
        bytes: loaded, downloadSeconds, verifySeconds: verifyMs / 1000, sessionSeconds, warmupSeconds, warmupSteps: 0,
        totalSeconds: (performance.now() - t0) / 1000, crossOriginIsolated: globalThis.crossOriginIsolated === true,
        decodeBatch: w.decodeBatch, profile, offGpu: [], stateBytesOnGpu: rt.bytes, adapter: dev.adapterName, runtime: 'rt_webgpu.js (hand-written WGSL, no onnxruntime)',
        nodes: { step: { dispatches: rt.dispatchesPerStep }, prompt: null },
      },
    });
  }

  async function generate({ promptIds, params, eosId }) {
    if (!rt) fail('no model loaded');
    checkParams(params);
    if (!promptIds.length) fail('the prompt is empty (it encodes to no tokens)');
    const bad = promptIds.find((id) => !(Number.isInteger(id) && id >= 0 && id < rt.V));
    if (bad !== undefined) fail(`prompt token id ${bad} is outside the model's vocab [0, ${rt.V})`);
    const greedy = params.temperature === 0;
    const want = greedy ? 'argmax' : 'logits';
    const rng = makeRng(params.seed);
    stopRequested = false;
    rt.reset();
    const t0 = performance.now();
    let out;
    let runs = 0;
    const batched = w.useSequence && promptIds.length > 1;
    if (batched) {
      for (let i = 0; i < promptIds.length && !stopRequested; i += PROMPT_CHUNK, runs++) {
        out = await rt.forward(promptIds.slice(i, i + PROMPT_CHUNK), i + PROMPT_CHUNK >= promptIds.length ? want : null);
        await yieldToEvents();
      }
    } else {
      for (const [i, id] of promptIds.entries()) {
        out = await rt.forward([id], i === promptIds.length - 1 ? want : null);
        runs++;
        await yieldToEvents();
        if (stopRequested) break;
      }
    }
    const t1 = performance.now();
    const mode = batched ? 'sequence' : 'step';
    post({ type: 'prompt', tokens: promptIds.length, ms: t1 - t0, mode, runs });
    const ids = [];
    let reason = 'max_tokens';
    let modelMs = 0;
    // a generated id: taken (and streamed) unless it is the end of text; true when generation ends with it
    const take = (id) => {
      if (eosId != null && id === eosId) { reason = 'eos'; return true; }
      ids.push(id);
      post({ type: 'token', id, n: ids.length, ms: performance.now() - t1 });
      return false;
    };
    const batch = greedy ? w.decodeBatch : 1;
    if (batch > 1) {
      // the GPU chains the steps (decodeGreedy): maxTokens steps, as the per-token loop below runs, ids in batches
      await yieldToEvents();
      if (stopRequested) reason = 'stopped';
      else if (params.maxTokens > 0 && !take(out)) {
        const tRun = performance.now();
        await rt.decodeGreedy(params.maxTokens, batch, (got) => {
          if (stopRequested) { reason = 'stopped'; return true; }
          // the last step's id is computed and not taken, as on the per-token path
          for (const id of got) if (ids.length === params.maxTokens || take(id)) return true;
          return false;
        });
        modelMs = performance.now() - tRun;
      }
    } else {
      for (let i = 0; i < params.maxTokens; i++) {
        await yieldToEvents();
        if (stopRequested) { reason = 'stopped'; break; }
        if (take(greedy ? out : sampleToken(out, params, rng))) break;
        const tRun = performance.now();
        out = await rt.forward([ids[ids.length - 1]], want);
        modelMs += performance.now() - tRun;
      }
    }
    const t2 = performance.now();
    post({
      type: 'done', ids, reason, promptTokens: promptIds.length, promptMs: t1 - t0, promptMode: mode, promptRuns: runs,
      generatedTokens: ids.length, generateMs: t2 - t1, modelMs,
    });
  }

  w.postMessage = (msg) => {
    if (msg.type === 'stop') { stopRequested = true; return; }
    if (busy) { post({ type: 'error', phase: msg.type, message: 'busy: wait for the current run to finish' }); return; }
    busy = true;
    if (msg.type === 'load') Object.assign(w, { useSequence: msg.useSequence !== false, decodeBatch: msg.decodeBatch ?? DECODE_BATCH });
    const job = msg.type === 'load' ? load(msg) : msg.type === 'generate' ? generate(msg) : Promise.reject(new Error(`unknown message type ${msg.type}`));
    job.catch((e) => post({ type: 'error', phase: msg.type === 'load' ? 'native' : msg.type, message: String(e.message || e).split('\n')[0] }))
      .finally(() => { busy = false; });
  };
  w.terminate = () => {
    stopRequested = true;
    rt?.destroy();
    device?.destroy();
    rt = null;
  };
  queueMicrotask(() => post({ type: 'ready' }));
  return w;
}
