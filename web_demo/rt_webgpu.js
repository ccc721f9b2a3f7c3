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
// int8 (model_int8.onnx, quantize.py's default "dynamic-int7") and int4 (model_q4.onnx, MatMulNBits bits 4) are
// repacked at load so that a thread's 16-byte load holds 4 outputs x 4 (int8) or 8 (int4) inputs, read once and
// coalesced as the fp32 kernel's. int8 computes onnxruntime's integers (MATVEC_I8's note): on tiny-pydoc in SwiftShader
// its logits equal onnxruntime's bit for bit (greedy ids: 512 of 512); on the H200 they equal them to 3e-6 until some activation's f32 value
// (the GPU's exp / LayerNorm differ in the last bit) falls on the other side of a quantization step, after which the
// state carries that (169M synthetic, teacher-forced: the first 5 steps within 3e-6, then ~0.15; top-1 38 of 40 the
// same), as onnxruntime-web and native onnxruntime part. int4 dequantizes to f32 (MatMulNBits' accuracy_level 0)
// rather than emulating accuracy_level 4's int8 activations, whose kernel (MLAS) differs per CPU: against onnxruntime
// at level 4 it agreed as well (tiny-pydoc: 512 of 512 greedy ids; 169M synthetic on the H200, teacher-forced: top-1 40
// of 40, logits within 0.17) and against level 0 within f32 rounding; it needs no activation pass (the int8-activation
// formulation was not built, so not measured).
// H200, Chromium 156, 169M shapes, 2026-12-01: fp32 810 tok/s, int8 890, int4 1153 (decode batch 16; prompt 16k,
// 40k tok/s).
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

import { fetchGraphFiles, yieldToEvents } from './fetch_files.js';
import { float16BitsToFloat32, stepGraph, stepGraphs } from './manifest.js';
import { DTYPE_CODES, onnxInitializers, tensorBytes } from './onnx_weights.js';
import { checkParams, makeRng, sampleToken } from './sampling.js';

export const BACKEND = 'webgpu-native';
export const DECODE_BATCH = 16; // greedy steps a command buffer (decodeGreedy): the page sees ids every 16 tokens
export const MAX_DECODE_BATCH = 64;
export const PROMPT_CHUNK = 512; // tokens per prompt call (activation buffers are sized for it: ~8 MB at 169M)
const ADAPTER_TIMEOUT_MS = 5000;
const WG = 256; // threads per workgroup in every kernel
const STATE_NAMES = ['att_x', 'att_aa', 'att_bb', 'att_pp', 'ffn_x'];
const FLOAT_MODES = { fp32: 'f32', fp16: 'f16' }; // variant -> how its matrices are stored (also 'i8', 'q4')
const RUNS = "the fp32, fp16, int8 (dynamic-int7) and int4 (MatMulNBits 4-bit) variants";

export class NativeError extends Error {}
const fail = (msg) => { throw new NativeError(msg); };

// ---- what this runtime runs -----------------------------------------------------------------------------------

// How a variant's matrices are stored: 'f32', 'f16', 'i8' (dynamic-int7: DynamicQuantizeLinear + MatMulInteger),
// 'q4' (MatMulNBits bits 4), or {why} for a variant this runtime does not run.
export function weightMode(manifest, variant) {
  const g = stepGraphs(manifest).find((x) => x.variant === variant);
  if (!g) return { why: `this folder has no step graph of variant '${variant}'` };
  if (FLOAT_MODES[variant] && !g.quantization?.bits) return FLOAT_MODES[variant];
  const q = g.quantization ?? {};
  const o = q.options ?? {};
  if (q.bits === 8 && q.method === 'dynamic-int7') return 'i8';
  if (q.bits === 8) return { why: `webgpu-native runs int8 as dynamic-int7 (DynamicQuantizeMatMul) only; this ${variant} is '${q.method}' (use wasm or webgpu for it)` };
  if (q.bits === 4 && q.method === 'matmul-nbits') {
    if (o.include_embedding || o.embedding_bits === 4) return { why: `webgpu-native runs int4 with an int8-row embedding only; ${variant} stores it as 4-bit blocks (GatherBlockQuantized; use wasm or webgpu for it)` };
    return 'q4';
  }
  return { why: `webgpu-native runs ${RUNS}, not '${variant}' (use wasm or webgpu for it)` };
}

// One line for a folder/variant this runtime cannot run; null when it can.
export function unsupported(manifest, variant) {
  const d = manifest.model;
  if (String(d.rwkv_version) !== '4') return `webgpu-native runs RWKV-4 only; this model is RWKV-${d.rwkv_version} (use wasm or webgpu)`;
  const mode = weightMode(manifest, variant);
  if (mode.why) return mode.why;
  const names = manifest.state.tensors.map((t) => t.name);
  if (names.join() !== STATE_NAMES.join()) return `webgpu-native expects the RWKV-4 state ${STATE_NAMES.join(', ')}; the manifest has ${names.join(', ')}`;
  const C = d.n_embd;
  if (C % 64 || d.ffn_dim % 64) return `webgpu-native needs n_embd and ffn_dim divisible by 64 (has ${C}, ${d.ffn_dim})`;
  if (mode === 'i8' && Math.max(C, d.ffn_dim) > 4 * QX_WORDS) return `webgpu-native's int8 kernels take n_embd and ffn_dim up to ${4 * QX_WORDS} (has ${C}, ${d.ffn_dim})`;
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
`;

const FLOAT_BINDINGS = `
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<W4>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
`;

// (after the bindings)
const MATMUL_EPI = `
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

// ---- int8 (dynamic-int7) and int4 (MatMulNBits) matrices ----------------------------------------------------------

// int8: onnxruntime's DynamicQuantizeLinear + MatMulInteger (fused there into DynamicQuantizeMatMul), computed with the
// same integers: the matmul's input vector x (one token's, one segment's: k, v and r each have their own) is quantized
// to uint8 with scale = (max(0, max x) - min(0, min x)) / 255, zero point zp = round-half-even(clamp(-min / scale,
// 0, 255)), q = clamp(round-half-even(x / scale) + zp, 0, 255); the int32 dot sum_k (q_k - zp) * w_kj is exact (as
// (q - 128) . w + (128 - zp) * colsum_j, so that both sides are signed bytes for dot4I8Packed); y_j = f32(dot) *
// (scale * wscale_j), in onnxruntime's order. WGSL's f32 division may be 2.5 ulp off, and a quotient one ulp off
// can round to the neighbouring integer: divx() divides exactly (integer long division, correctly rounded), used for
// scale and zero point, and for x / scale wherever the fast quotient lies within 2^-10 of a rounding boundary.
// Weights: [K / 4, Np] u32, word (k4, j) = w[4 k4 .. 4 k4 + 3, j] as 4 signed bytes (repacked from the file's [K, N]
// at load: a thread's vec4u is 4 outputs x 4 inputs, and 8 lanes read 128 contiguous bytes, as the fp32 kernel).
// CI: [2][Np] words: the column scales (f32 bits), then the column sums (i32).
const QMATH = `
// a / b correctly rounded (b > 0 and normal, a finite; a subnormal quotient is not rounded right, and is < 2^-126)
fn divx(a: f32, b: f32) -> f32 {
  if (a == 0.0) { return 0.0; }
  let ua = bitcast<u32>(abs(a));
  let ub = bitcast<u32>(b);
  var ea = i32(ua >> 23u);
  var ma = ua & 0x7fffffu;
  if (ea == 0) { ea = 1; } else { ma |= 0x800000u; }
  var eb = i32(ub >> 23u);
  var mb = ub & 0x7fffffu;
  if (eb == 0) { eb = 1; } else { mb |= 0x800000u; }
  while (ma < 0x800000u) { ma <<= 1u; ea -= 1; }
  while (mb < 0x800000u) { mb <<= 1u; eb -= 1; }
  var q = 0u;
  var r = ma;
  var n = 25;
  if (r >= mb) { q = 1u; r -= mb; n = 24; }
  for (var i = 0; i < n; i++) {
    r <<= 1u;
    q <<= 1u;
    if (r >= mb) { r -= mb; q |= 1u; }
  }
  var m = q >> 1u; // q has 25 significant bits: 24 of mantissa and the rounding bit; r != 0 is the sticky bit
  if ((q & 1u) == 1u && (r != 0u || (m & 1u) == 1u)) { m += 1u; }
  return sign(a) * ldexp(f32(m), ea - eb - n + 1);
}

// (scale, zp) of DynamicQuantizeLinear from the input's min and max
fn qparams(lo: f32, hi: f32) -> vec2f {
  let mn = min(lo, 0.0);
  let mx = max(hi, 0.0);
  var s = 1.0;
  if (mx != mn) { s = divx(mx - mn, 255.0); }
  return vec2f(s, round(clamp(-divx(mn, s), 0.0, 255.0)));
}

// x quantized, minus 128 (as a signed byte's bits): q - 128 in [-128, 127]
fn quant(x: f32, qp: vec2f) -> u32 {
  var d = x / qp.x;
  if (abs(fract(d) - 0.5) < 0.0009765625) { d = divx(x, qp.x); }
  let q = clamp(round(d), -qp.y, 255.0 - qp.y) + qp.y;
  return u32(i32(q) - 128) & 0xffu;
}

fn quant4(x: vec4f, qp: vec2f) -> u32 {
  return quant(x.x, qp) | (quant(x.y, qp) << 8u) | (quant(x.z, qp) << 16u) | (quant(x.w, qp) << 24u);
}
`;

// dot4: WGSL's dot4I8Packed where the adapter's WGSL has packed_4x8_integer_dot_product, else the same sum unpacked
function wgslI8Dot(dot4) {
  return `
fn dot4(a: u32, b: u32) -> i32 {
  ${dot4 ? 'return dot4I8Packed(a, b);' : `var s = 0i;
  for (var i = 0u; i < 32u; i += 8u) { s += extractBits(bitcast<i32>(a), i, 8u) * extractBits(bitcast<i32>(b), i, 8u); }
  return s;`}
}

// y_j from the exact dot of (q - 128) . w
fn deq(acc: i32, j: u32, qp: vec2f) -> f32 {
  let t = acc + (128 - i32(qp.y)) * bitcast<i32>(CI[p.Np + j]);
  return f32(t) * (qp.x * bitcast<f32>(CI[j]));
}
`;
}

const I8_BINDINGS = `
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<vec4u>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
@group(0) @binding(5) var<storage, read> CI: array<u32>;
`;

// One token, int8: as MATVEC, after each workgroup quantizes its segment's input itself (min/max, then the K values
// into workgroup memory as packed bytes: K / 4 words, at most QX_WORDS); the weights are read once, 16 bytes a load.
const QX_WORDS = 2048;
const MATVEC_I8 = `
var<workgroup> qx: array<u32, ${QX_WORDS}>;
var<workgroup> part: array<vec4i, ${WG}>;
var<workgroup> lo: array<f32, ${WG}>;
var<workgroup> hi: array<f32, ${WG}>;
@compute @workgroup_size(8, 32)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let li = l.y * 8u + l.x;
  let xb = seg(wg.x * 32u) * p.xseg;
  var a = 3.4e38;
  var b = -3.4e38;
  for (var k = li; k < p.K; k += ${WG}u) { let v = X[xb + k]; a = min(a, v); b = max(b, v); }
  lo[li] = a;
  hi[li] = b;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h >>= 1u) {
    if (li < h) { lo[li] = min(lo[li], lo[li + h]); hi[li] = max(hi[li], hi[li + h]); }
    workgroupBarrier();
  }
  let qp = qparams(lo[0], hi[0]);
  let K4 = p.K / 4u;
  for (var k4 = li; k4 < K4; k4 += ${WG}u) {
    let o = xb + 4u * k4;
    qx[k4] = quant4(vec4f(X[o], X[o + 1u], X[o + 2u], X[o + 3u]), qp);
  }
  workgroupBarrier();
  let j = (wg.x * 8u + l.x) * 4u;
  let row = p.Np / 4u;
  let c = j / 4u;
  var a0 = vec4i(0);
  var a1 = vec4i(0);
  if (j < p.Np) {
    var k = l.y;
    for (; k + 32u < K4; k += 64u) {
      let x0 = qx[k];
      let w0 = W[k * row + c];
      let x1 = qx[k + 32u];
      let w1 = W[(k + 32u) * row + c];
      a0 += vec4i(dot4(x0, w0.x), dot4(x0, w0.y), dot4(x0, w0.z), dot4(x0, w0.w));
      a1 += vec4i(dot4(x1, w1.x), dot4(x1, w1.y), dot4(x1, w1.z), dot4(x1, w1.w));
    }
    for (; k < K4; k += 32u) {
      let x0 = qx[k];
      let w0 = W[k * row + c];
      a0 += vec4i(dot4(x0, w0.x), dot4(x0, w0.y), dot4(x0, w0.z), dot4(x0, w0.w));
    }
  }
  part[li] = a0 + a1;
  workgroupBarrier();
  for (var h = 16u; h > 0u; h >>= 1u) {
    if (l.y < h) { part[li] += part[li + h * 8u]; }
    workgroupBarrier();
  }
  if (l.y == 0u && j < p.Np) {
    let r = part[l.x];
    epi(0u, j, deq(r.x, j, qp)); epi(0u, j + 1u, deq(r.y, j + 1u, qp));
    epi(0u, j + 2u, deq(r.z, j + 2u, qp)); epi(0u, j + 3u, deq(r.w, j + 3u, qp));
  }
}
`;

// T tokens, int8, pass 1: each token's segments quantized as MATVEC_I8 does (workgroup (t, segment)) into
// QX[segment][t][K / 4] and its (scale, zp) into QP[segment][t].
const QUANT_I8 = `
struct P { K: u32, xs: u32, xseg: u32, Tmax: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read_write> QX: array<u32>;
@group(0) @binding(4) var<storage, read_write> QP: array<vec2f>;
var<workgroup> lo: array<f32, ${WG}>;
var<workgroup> hi: array<f32, ${WG}>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let t = wg.x;
  let s = wg.y;
  let xb = s * p.xseg + t * p.xs;
  var a = 3.4e38;
  var b = -3.4e38;
  for (var k = li; k < p.K; k += ${WG}u) { let v = X[xb + k]; a = min(a, v); b = max(b, v); }
  lo[li] = a;
  hi[li] = b;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h >>= 1u) {
    if (li < h) { lo[li] = min(lo[li], lo[li + h]); hi[li] = max(hi[li], hi[li + h]); }
    workgroupBarrier();
  }
  let qp = qparams(lo[0], hi[0]);
  let K4 = p.K / 4u;
  let ob = (s * p.Tmax + t) * K4;
  for (var k4 = li; k4 < K4; k4 += ${WG}u) {
    let o = xb + 4u * k4;
    QX[ob + k4] = quant4(vec4f(X[o], X[o + 1u], X[o + 2u], X[o + 3u]), qp);
  }
  if (li == 0u) { QP[s * p.Tmax + t] = qp; }
}
`;

// T tokens, int8, pass 2: GEMM's tiles with exact i32 sums (x tile from QX, weight tile unpacked from the words).
const GEMM_I8 = `
@group(0) @binding(6) var<storage, read> QX: array<u32>;
@group(0) @binding(7) var<storage, read> QP: array<vec2f>;
var<workgroup> xt: array<i32, 1024>; // [k][t] of the tile
var<workgroup> wt: array<i32, 1024>; // [k][j]
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let j0 = wg.x * 64u;
  let t0 = wg.y * 64u;
  let sg = seg(j0);
  let tid = l.y * 16u + l.x;
  let row = p.Np / 4u;
  let K4 = p.K / 4u;
  let Tmax = p.p13;
  var acc: array<vec4i, 4>;
  for (var k0 = 0u; k0 < p.K; k0 += 16u) {
    let m = tid / 4u;
    let kq = tid % 4u;
    let t = t0 + m;
    var xw = 0u; // past the last token (never written out)
    if (t < run.T) { xw = QX[(sg * Tmax + t) * K4 + k0 / 4u + kq]; }
    for (var q = 0u; q < 4u; q++) { xt[(kq * 4u + q) * 64u + m] = extractBits(bitcast<i32>(xw), q * 8u, 8u); }
    let k4 = tid / 64u;
    let jj = tid % 64u;
    var ww = 0u;
    if (j0 + jj < p.Np) { ww = W[(k0 / 4u + k4) * row + (j0 + jj) / 4u][jj % 4u]; }
    for (var q = 0u; q < 4u; q++) { wt[(k4 * 4u + q) * 64u + jj] = extractBits(bitcast<i32>(ww), q * 8u, 8u); }
    workgroupBarrier();
    for (var kk = 0u; kk < 16u; kk++) {
      let b = vec4i(wt[kk * 64u + l.x * 4u], wt[kk * 64u + l.x * 4u + 1u], wt[kk * 64u + l.x * 4u + 2u], wt[kk * 64u + l.x * 4u + 3u]);
      for (var i = 0u; i < 4u; i++) { acc[i] += xt[kk * 64u + l.y * 4u + i] * b; }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let t = t0 + l.y * 4u + i;
    let j = j0 + l.x * 4u;
    if (t < run.T && j < p.Np) {
      let qp = QP[sg * Tmax + t];
      epi(t, j, deq(acc[i].x, j, qp)); epi(t, j + 1u, deq(acc[i].y, j + 1u, qp));
      epi(t, j + 2u, deq(acc[i].z, j + 2u, qp)); epi(t, j + 3u, deq(acc[i].w, j + 3u, qp));
    }
  }
}
`;

// int4 (MatMulNBits, bits 4): the weights dequantized to f32, w = (q - zp) * scale per block of `bs` inputs, and an
// f32 dot (see the module doc for why not int8 activations). Weights: [K / 8, Np] u32, word (k8, j) = the 8 nibbles
// of w[8 k8 .. 8 k8 + 7, j], low nibble first (the file's column-major blocks, transposed at load); SZ: [K / bs][Np]
// (scale, zp) pairs.
const Q4_BINDINGS = `
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<vec4u>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
@group(0) @binding(5) var<storage, read> SZ: array<vec4f>;

// 8 inputs x 4 outputs: x[0..8] . dequantized word column
fn dot8(x0: vec4f, x1: vec4f, w: vec4u, s: vec4f, z: vec4f) -> vec4f {
  var r = vec4f(0.0);
  for (var i = 0u; i < 4u; i++) {
    let u = w[i];
    let a = vec4f(f32(u & 15u), f32((u >> 4u) & 15u), f32((u >> 8u) & 15u), f32((u >> 12u) & 15u)) - z[i];
    let b = vec4f(f32((u >> 16u) & 15u), f32((u >> 20u) & 15u), f32((u >> 24u) & 15u), f32(u >> 28u)) - z[i];
    r[i] = (dot(x0, a) + dot(x1, b)) * s[i];
  }
  return r;
}
`;

// p.p13 = log2(bs / 8): k8 rows per block
const MATVEC_Q4 = `
var<workgroup> part: array<vec4f, ${WG}>;
@compute @workgroup_size(8, 32)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let j = (wg.x * 8u + l.x) * 4u;
  let xb = seg(wg.x * 32u) * p.xseg;
  let row = p.Np / 4u;
  let c = j / 4u;
  let K8 = p.K / 8u;
  var a0 = vec4f(0.0);
  var a1 = vec4f(0.0);
  if (j < p.Np) {
    var k = l.y;
    for (; k + 32u < K8; k += 64u) {
      let w0 = W[k * row + c];
      let w1 = W[(k + 32u) * row + c];
      let b0 = (k >> p.p13) * row + c;
      let b1 = ((k + 32u) >> p.p13) * row + c;
      let s0 = SZ[2u * b0]; let z0 = SZ[2u * b0 + 1u];
      let s1 = SZ[2u * b1]; let z1 = SZ[2u * b1 + 1u];
      a0 += dot8(vec4f(X[xb + 8u * k], X[xb + 8u * k + 1u], X[xb + 8u * k + 2u], X[xb + 8u * k + 3u]),
                 vec4f(X[xb + 8u * k + 4u], X[xb + 8u * k + 5u], X[xb + 8u * k + 6u], X[xb + 8u * k + 7u]), w0, s0, z0);
      let o = xb + 8u * (k + 32u);
      a1 += dot8(vec4f(X[o], X[o + 1u], X[o + 2u], X[o + 3u]), vec4f(X[o + 4u], X[o + 5u], X[o + 6u], X[o + 7u]), w1, s1, z1);
    }
    for (; k < K8; k += 32u) {
      let w0 = W[k * row + c];
      let b0 = (k >> p.p13) * row + c;
      let o = xb + 8u * k;
      a0 += dot8(vec4f(X[o], X[o + 1u], X[o + 2u], X[o + 3u]), vec4f(X[o + 4u], X[o + 5u], X[o + 6u], X[o + 7u]), w0, SZ[2u * b0], SZ[2u * b0 + 1u]);
    }
  }
  let li = l.y * 8u + l.x;
  part[li] = a0 + a1;
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

// T tokens, int4: GEMM with the weight tile dequantized from the words (16 inputs = 2 word rows of 64 outputs)
const GEMM_Q4 = `
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
    if (tid < 128u) {
      let k8 = k0 / 8u + tid / 64u;
      let jj = tid % 64u;
      var u = 0u;
      var s = 0.0;
      var z = 0.0;
      if (j0 + jj < p.Np) {
        u = W[k8 * row + (j0 + jj) / 4u][jj % 4u];
        let b = (k8 >> p.p13) * row + (j0 + jj) / 4u;
        s = SZ[2u * b][jj % 4u];
        z = SZ[2u * b + 1u][jj % 4u];
      }
      for (var q = 0u; q < 8u; q++) { wt[((tid / 64u) * 8u + q) * 64u + jj] = (f32((u >> (4u * q)) & 15u) - z) * s; }
    }
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

// x[t] = emb[ids[t]] (LN0 is folded into emb at export); int8 rows: DequantizeLinear's f32(q) * row scale
function wgslEmbed(mode) {
  const read = {
    f32: 'x[g.x] = E[e];',
    f16: 'x[g.x] = unpack2x16float(E[e / 2u])[e % 2u];',
    i8: 'x[g.x] = f32(extractBits(bitcast<i32>(E[e / 4u]), (e % 4u) * 8u, 8u)) * ES[ids[t]];',
  }[mode === 'f16' || mode === 'f32' ? mode : 'i8'];
  return `
struct P { C: u32, p1: u32, p2: u32, p3: u32 }
${RUN}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<uniform> run: Run;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> E: array<${mode === 'f32' ? 'f32' : 'u32'}>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
${mode === 'f32' || mode === 'f16' ? '' : '@group(0) @binding(5) var<storage, read> ES: array<f32>;'}
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  if (g.x >= run.T * p.C) { return; }
  let t = g.x / p.C;
  let e = ids[t] * p.C + g.x % p.C;
  ${read}
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
  // device: a GPUDevice; files: Map file name -> bytes holding the graph's .onnx and its data files; opts.dot4: false
  // computes int8 dots with unpacked bytes even where dot4I8Packed exists (tests compare the two).
  constructor(device, manifest, variant, files, opts = {}) {
    const why = unsupported(manifest, variant);
    if (why) fail(why);
    const graph = stepGraph(manifest, variant);
    const d = manifest.model;
    const L = d.n_layer;
    const C = d.n_embd;
    const F = d.ffn_dim;
    const V = d.vocab_size;
    Object.assign(this, { device, manifest, variant, graph, L, C, F, V, buffers: [], opts });
    const onnx = files.get(graph.file);
    if (!onnx) fail(`${graph.file} was not downloaded`);
    const inits = onnxInitializers(onnx);
    this.mode = weightMode(manifest, variant);
    const wdtype = this.mode === 'f16' ? 'float16' : 'float32';
    this.f16 = this.mode === 'f16';
    const every = graph.quantization?.rescale_every ?? 0;
    // an initializer: dims checked (a number per dimension, or null: any; dims null: any shape), dtype one of `dtypes`
    const raw = (name, dims, dtypes) => {
      const t = inits.get(name);
      if (!t) fail(`${graph.file} has no initializer '${name}': not an rwkv-export RWKV-4 ${variant} step graph of this version`);
      if (dims && (t.dims.length !== dims.length || dims.some((n, i) => n !== null && n !== t.dims[i]))) fail(`${graph.file}: ${name} has shape ${JSON.stringify(t.dims)}, expected ${JSON.stringify(dims)}`);
      const dtype = DTYPE_CODES[t.dtype];
      if (!dtypes.includes(dtype)) fail(`${graph.file}: ${name} has ONNX data type ${dtype ?? t.dtype}; webgpu-native expects ${dtypes.join(' or ')} here`);
      return { ...t, dtype, bytes: tensorBytes(t, graph, files) };
    };
    const tensor = (name, dims) => raw(name, dims, ['float32', 'float16']);
    const matrix = (names, K, widths) => {
      if (this.mode === 'i8') return this.int8Matrix(names.map((n, i) => int8Weight(n, K, widths[i])), K);
      if (this.mode === 'q4') return this.int4Matrix(names.map((n, i) => int4Weight(n, K, widths[i])), K);
      return this.matrixBuffer(names.map((n, i) => tensor(n, [K, widths[i]])), wdtype, K);
    };
    const vector = (name, dims) => this.upload(toF32(tensor(name, dims)), U.STORAGE, name);
    // int8 (dynamic-int7): NAME_quantized [K, N] int8, NAME_scale [N] (or one for all), NAME_zero_point all 0
    const int8Weight = (name, K, N) => {
      const q = raw(`${name}_quantized`, [K, N], ['int8']);
      const sc = raw(`${name}_scale`, null, ['float32']); // [N] per column, or one value (per_channel off)
      const zp = raw(`${name}_zero_point`, null, ['int8']);
      const n = sc.bytes.byteLength / 4;
      if (![1, N].includes(n) || zp.bytes.byteLength !== n) fail(`${graph.file}: ${name}_scale has ${n} values for ${N} columns`);
      if (zp.bytes.some((b) => b !== 0)) fail(`${graph.file}: ${name} has nonzero weight zero points; webgpu-native runs symmetric int8 weights (dynamic-int7)`);
      const scale = new Float32Array(sc.bytes.slice().buffer);
      return { name, N, q: new Int8Array(q.bytes.buffer, q.bytes.byteOffset, q.bytes.byteLength), scale: scale.length === 1 ? new Float32Array(N).fill(scale[0]) : scale };
    };
    // int4 (MatMulNBits bits 4): NAME_Q4 [N, blocks, bs / 2] uint8, NAME_scales [N * blocks], NAME_zero_points
    // [N, ceil(blocks / 2)] uint8 (absent: 8, symmetric)
    const int4Weight = (name, K, N) => {
      const q = raw(`${name}_Q4`, [N, null, null], ['uint8']);
      const [, nb, blob] = q.dims;
      const bs = 2 * blob;
      if (nb !== Math.ceil(K / bs) || bs < 16 || bs & (bs - 1)) fail(`${graph.file}: ${name}_Q4 has shape ${JSON.stringify(q.dims)}, not MatMulNBits 4-bit blocks of a power of two >= 16 over K = ${K}`);
      const sc = raw(`${name}_scales`, null, ['float32']);
      if (sc.bytes.byteLength !== 4 * N * nb) fail(`${graph.file}: ${name}_scales has ${sc.bytes.byteLength / 4} values, expected ${N * nb}`);
      const zpt = inits.has(`${name}_zero_points`) ? raw(`${name}_zero_points`, null, ['uint8']) : null;
      if (zpt && zpt.bytes.byteLength !== N * Math.ceil(nb / 2)) fail(`${graph.file}: ${name}_zero_points has ${zpt.bytes.byteLength} bytes, expected ${N * Math.ceil(nb / 2)}`);
      return { name, N, nb, bs, q: q.bytes, scale: new Float32Array(sc.bytes.slice().buffer), zp: zpt?.bytes ?? null };
    };

    if (inits.has('emb_qint8')) { // int8 rows and a scale per row (Gather + DequantizeLinear)
      const e = raw('emb_qint8', [V, C], ['int8']);
      this.emb = this.upload(e.bytes, U.STORAGE, 'emb (int8 rows)');
      this.embScale = this.upload(raw('emb_row_scale', [V], ['float32']).bytes, U.STORAGE, 'emb row scales');
      this.embMode = 'i8';
    } else {
      if (this.mode === 'q4' || this.mode === 'i8') {
        if (!inits.has('emb')) fail(`${graph.file} stores its embedding in a form webgpu-native does not read (not emb_qint8 int8 rows, not an fp32 emb)`);
      }
      this.embMode = this.f16 ? 'f16' : 'f32';
      this.emb = this.upload(weightBytes(tensor('emb', [V, C]), this.f16 ? 'float16' : 'float32'), U.STORAGE, 'emb');
    }
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
    if (this.mode === 'i8') { // the prompt path's quantized activations (QUANT_I8)
      this.qx = this.buffer(T * Math.max(3 * C, F), U.STORAGE, 'quantized activations');
      this.qp = this.buffer(8 * 3 * T, U.STORAGE, 'activation scales, zero points');
    }
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

  // int8: the tensors side by side along the outputs as [K / 4, Np] words of 4 signed bytes (4 inputs of one output:
  // MATVEC_I8 reads a vec4u = 4 outputs x 4 inputs), and CI = column scales (f32 bits), column sums (i32).
  int8Matrix(ws, K) {
    const N = ws.reduce((a, w) => a + w.N, 0);
    const Np = align(N, 4);
    const words = new Uint32Array((K / 4) * Np);
    const b8 = new Uint8Array(words.buffer);
    const ci = new Uint32Array(2 * Np);
    const scales = new Float32Array(ci.buffer, 0, Np);
    const sums = new Int32Array(ci.buffer, 4 * Np, Np);
    let off = 0;
    for (const w of ws) {
      const { q, N: n } = w;
      for (let k = 0; k < K; k++) {
        const base = (k >> 2) * Np + off;
        const r = k * n;
        for (let j = 0; j < n; j++) {
          const v = q[r + j];
          b8[4 * (base + j) + (k & 3)] = v;
          sums[off + j] += v;
        }
      }
      scales.set(w.scale, off);
      off += n;
    }
    const label = ws.map((w) => w.name).join('|');
    const bounds = [ws[0].N, ws[0].N + (ws[1]?.N ?? 0)];
    return { buffer: this.upload(b8, U.STORAGE, label), ci: this.upload(new Uint8Array(ci.buffer), U.STORAGE, `${label} scales, sums`), N, Np, bounds, K };
  }

  // int4: [K / 8, Np] words of 8 nibbles (8 inputs of one output, low nibble first: the file's bytes of one column,
  // transposed), and SZ = [blocks][Np / 4] pairs of vec4 (4 outputs' scales, then their zero points).
  int4Matrix(ws, K) {
    const N = ws.reduce((a, w) => a + w.N, 0);
    const Np = align(N, 4);
    const { nb, bs } = ws[0];
    if (ws.some((w) => w.bs !== bs)) fail(`${ws.map((w) => w.name).join(', ')} have different block sizes`);
    const K8 = K / 8;
    const words = new Uint32Array(K8 * Np);
    const row = Np / 4;
    const sz = new Float32Array(nb * row * 8);
    const per = bs / 8; // word rows per block
    let off = 0;
    for (const w of ws) {
      const { q, N: n, scale, zp } = w;
      const blob = bs / 2;
      for (let j = 0; j < n; j++) {
        const col = j * nb * blob;
        for (let k8 = 0; k8 < K8; k8++) {
          const at = col + Math.floor(k8 / per) * blob + 4 * (k8 % per);
          words[k8 * Np + off + j] = (q[at] | (q[at + 1] << 8) | (q[at + 2] << 16) | (q[at + 3] << 24)) >>> 0;
        }
        const jj = off + j;
        for (let b = 0; b < nb; b++) {
          const i = 8 * (b * row + (jj >> 2)) + (jj & 3);
          sz[i] = scale[j * nb + b];
          sz[i + 4] = zp ? (zp[j * Math.ceil(nb / 2) + (b >> 1)] >> (4 * (b & 1))) & 15 : 8;
        }
      }
      off += n;
    }
    const label = ws.map((w) => w.name).join('|');
    const bounds = [ws[0].N, ws[0].N + (ws[1]?.N ?? 0)];
    return { buffer: this.upload(new Uint8Array(words.buffer), U.STORAGE, label), ci: this.upload(new Uint8Array(sz.buffer), U.STORAGE, `${label} scales, zero points`), N, Np, bounds, K, log2Rows: Math.log2(per) };
  }

  // Pipelines, uniforms and bind groups of every dispatch, once: a step only encodes them.
  build() {
    const dev = this.device;
    const { L, C, F, V } = this;
    const Tmax = PROMPT_CHUNK;
    const w = wgslWeights(this.f16);
    const mode = this.mode;
    // packed_4x8_integer_dot_product: dot4I8Packed (DP4A where the GPU has it); without it, the bytes unpacked
    this.dot4 = mode === 'i8' && this.opts.dot4 !== false && navigator.gpu?.wgslLanguageFeatures?.has('packed_4x8_integer_dot_product') === true;
    const i8 = (body) => (this.dot4 ? 'requires packed_4x8_integer_dot_product;\n' : '') + MATMUL_COMMON + I8_BINDINGS + MATMUL_EPI + QMATH + wgslI8Dot(this.dot4) + body;
    const q4 = (body) => MATMUL_COMMON + Q4_BINDINGS + MATMUL_EPI + body;
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
      embed: layoutOf(this.embMode === 'i8' ? 'uurrwr' : 'uurrw'), mm: layoutOf({ i8: 'uurrwr', q4: 'uurrwr' }[mode] ?? 'uurrw'),
      gemm: layoutOf(mode === 'i8' ? 'uurrwrrr' : { q4: 'uurrwr' }[mode] ?? 'uurrw'), quant: layoutOf('uurww'),
      ln: layoutOf('uurwrrrw'), wkv: layoutOf('uurwrrw'), am: layoutOf('urww'),
    };
    const mmCode = {
      i8: [i8(MATVEC_I8), i8(GEMM_I8)], q4: [q4(MATVEC_Q4), q4(GEMM_Q4)],
    }[mode] ?? [w + MATMUL_COMMON + FLOAT_BINDINGS + MATMUL_EPI + MATVEC, w + MATMUL_COMMON + FLOAT_BINDINGS + MATMUL_EPI + GEMM];
    this.pipes = {
      embed: pipe(wgslEmbed(this.embMode), lay.embed, 'embed'),
      matvec: pipe(mmCode[0], lay.mm, `matvec (${mode})`),
      gemm: pipe(mmCode[1], lay.gemm, `gemm (${mode})`),
      ...(mode === 'i8' ? { quant: pipe(QUANT_I8 + QMATH, lay.quant, 'quantize activations') } : {}),
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
    const embed = group(lay.embed, [uniform([C]), this.run, this.ids, this.emb, this.x, ...(this.embMode === 'i8' ? [this.embScale] : [])]);
    ops.push({ kind: 'embed', group: embed, at: (T) => ['embed', Math.ceil((T * C) / WG), 1] });
    // a matmul: one token through the matvec, T tokens through the tiled kernel; the head always takes one row
    // (int8: T tokens are quantized by a dispatch of their own first, QUANT_I8; its at(1) is null: not dispatched)
    const mm = (X, Wm, Y, { xs, xseg = 0, ys, acts, gate = 0, scale = 1, oneRow = false }) => {
      const p13 = mode === 'i8' ? Tmax : mode === 'q4' ? Wm.log2Rows : 0;
      const p = uniform([Wm.K, Wm.N, Wm.Np, Wm.bounds[0], Wm.bounds[1], xs, xseg, ys, ...acts, gate, { f: scale }, p13]);
      const extra = mode === 'i8' || mode === 'q4' ? [Wm.ci] : [];
      const mv = group(lay.mm, [p, this.run, X, Wm.buffer, Y, ...extra]);
      const gm = mode === 'i8' ? group(lay.gemm, [p, this.run, X, Wm.buffer, Y, Wm.ci, this.qx, this.qp]) : mv;
      const op = {
        group: mv,
        at: (T) => (T === 1 || oneRow ? ['matvec', Math.ceil(Wm.Np / 32), 1] : ['gemm', Math.ceil(Wm.Np / 64), Math.ceil(T / 64), gm]),
      };
      if (mode !== 'i8' || oneRow) return [op];
      const nseg = 1 + (Wm.bounds[0] < Wm.N) + (Wm.bounds[1] < Wm.N);
      const q = group(lay.quant, [uniform([Wm.K, xs, xseg, Tmax]), this.run, X, this.qx, this.qp]);
      return [{ group: q, at: (T) => (T === 1 ? null : ['quant', T, nseg]) }, op];
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
      const kind = (k, op) => [op].flat().map((o) => Object.assign(o, { kind: k }));
      ops.push(...kind('ln1+mix', lnMix(0, i, ly.ln1w, ly.ln1b, ly.attMix, 3)));
      ops.push(...kind('att k/v/r', mm(this.mixed, ly.kvr, this.big, { xs: C, xseg: Tmax * C, ys: 3 * C, acts: [0, 0, 1] })));
      ops.push(...kind('wkv', wkv(i, ly)));
      ops.push(...kind('att out', mm(this.rwkv, ly.out, this.x, { xs: C, ys: C, acts: [3, 3, 3] })));
      ops.push(...kind('ln2+mix', lnMix(4, i, ly.ln2w, ly.ln2b, ly.ffnMix, 2)));
      ops.push(...kind('ffn k/r', mm(this.mixed, ly.kr, this.big, { xs: C, xseg: Tmax * C, ys: F + C, acts: [2, 1, 1] })));
      ops.push(...kind('ffn v', mm(this.big, ly.val, this.x, { xs: F + C, ys: C, acts: [4, 4, 4], gate: F, scale: ly.scale })));
    }
    // ln_out of the last token (the mix input is unused with nmix = 0), then the head
    const last = group(lay.ln, [uniform([C, 0, 0, 0]), this.run, this.x, this.state, this.lnOutW, this.lnOutB, this.lnOutW, this.h]);
    ops.push({ kind: 'ln_out', group: last, at: () => ['ln', 1, 1] });
    ops.push({ kind: 'head', ...mm(this.h, this.head, this.logits, { xs: C, ys: 0, acts: [0, 0, 0], oneRow: true })[0] });
    this.ops = ops;
    this.stepOps = ops.filter((op) => op.at(1)); // a token's dispatches (the int8 prompt path's quantize passes are not)
    this.argmaxOp = { kind: 'argmax', group: group(lay.am, [uniform([V, MAX_DECODE_BATCH]), this.logits, this.ids, this.gen]), at: () => ['argmax', 1, 1] };
    this.dispatchesPerStep = this.stepOps.length + 1;
  }

  reset() {
    this.device.queue.writeBuffer(this.state, 0, this.stateInit);
  }

  // One line: how this variant's matmuls compute (loadInfo.weights)
  describeWeights() {
    return {
      f32: 'fp32 weights, f32 arithmetic',
      f16: 'fp16 weights unpacked to f32, f32 arithmetic',
      i8: `int8 weights, activations quantized to uint8 per token on the GPU, exact int32 dots (${this.dot4 ? 'dot4I8Packed' : 'bytes unpacked: no packed_4x8_integer_dot_product'}), as onnxruntime's DynamicQuantizeMatMul`,
      q4: 'int4 blocks dequantized to f32, f32 dots (MatMulNBits at accuracy_level 0)',
    }[this.mode] + (this.embMode === 'i8' ? '; int8 embedding rows' : '');
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
      const at = op.at(T);
      if (!at) continue;
      const [pipeline, x, y, grp = op.group] = at;
      pass.setPipeline(this.pipes[pipeline]);
      pass.setBindGroup(0, grp);
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
    const steps = [...this.stepOps, this.argmaxOp];
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
    const steps = [...this.stepOps, this.argmaxOp];
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

// The graph's files (size, and sha256 when verify), with worker.js's progress messages through post.
async function fetchGraph(manifest, modelBase, graph, verify, post = () => {}) {
  const r = await fetchGraphFiles(manifest, modelBase, [graph], verify, post);
  return { bytes: r.files, loaded: r.bytes, verifyMs: r.verifySeconds * 1000, downloadSeconds: r.seconds };
}

// runtimes.html's adapter interface (rt_common.js): a runner over this runtime, logits read back at every call.
export async function open({ manifest, modelBase, graph, verify }) {
  const why = unsupported(manifest, graph.variant);
  if (why) fail(why);
  const { device, adapterName } = await requestDevice();
  const { bytes, loaded } = await fetchGraph(manifest, modelBase, graph, verify);
  const rt = new RwkvWebGPU(device, manifest, graph.variant, bytes);
  return {
    backend: BACKEND, threads: null, bytes: loaded, notes: [`${rt.dispatchesPerStep - 1} dispatches a token on ${adapterName}; ${rt.describeWeights()}`],
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
        weights: rt.describeWeights(),
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
