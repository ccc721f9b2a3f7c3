// Step server for a TF.js graph model, driven by rwkv_export.tf_runners.TFJSStepRunner (one Node process per runner).
//
//   node tfjs_step.mjs path/to/model.json [PACKAGES_DIR] [BACKEND] [DECODER]
//
// PACKAGES_DIR holds the node_modules installed from this folder's package-lock.json (default: this folder; an
// installed wheel keeps them in the user cache, see rwkv_export/node.py).
// BACKEND is "wasm" (the default: @tensorflow/tfjs-backend-wasm, its SIMD binary, single-threaded: TF.js 4.22 turns
// the wasm backend's threads off under Node, and forcing WASM_HAS_MULTITHREAD_SUPPORT on fails to initialise: its
// pthread workers are blob: URLs, which Node's worker_threads refuse, ERR_WORKER_PATH) or "cpu" (the pure-JS CPU
// backend). The .wasm binaries are read from the installed package's dist/ folder, never fetched. Where the wasm
// backend cannot initialise, the driver falls back to cpu and says why in its ready line ("fallback"); the Python side
// reports it, so a fallback is never silent.
// Loads the model with @tensorflow/tfjs on that backend, then answers each request on stdin. A request is one JSON
// line, followed by `bytes` raw bytes where it says so; an answer is one JSON line, followed by `bytes` raw bytes
// where it says so. The raw bytes are float32 arrays (little-endian) end to end, in the order the line's `arrays`
// lists them ([name, count] pairs); a request's are the state, in the order of the ready line's `states` (`sizes`:
// their counts). Binary, not base64 in JSON: at 169M shapes a step moves 0.2 MB of logits and 0.2 MB of state each
// way, whose base64 coding and JSON parsing cost the Python side 3.1-3.6 ms of CPU a step (now 0.5-0.8) and Node
// 1-2 ms; the bytes are the same either way.
//   {"op": "step", "token": 5, "bytes": N} + state
//     -> {"arrays": [["logits", V], ["att_x", n], ...], "bytes": M} + logits, state
//        (+ ["hidden", C] last when the signature has a `hidden` output: an export made with --embedding)
//   {"op": "greedy", "token": 5, "n": 32, "bytes": N} + state   (n steps in Node, each feeding back its argmax; timed)
//     -> {"tokens": [...], "seconds": 1.23, "rss_mb": 1234.5, "arrays": [["att_x", n], ...], "bytes": M} + state
//   {"op": "prefill", "tokens": [5, 7, ...], "bytes": N} + state   (one call of the prompt graph: 1 <= T <= max_chunk)
//     -> {"seconds": 0.12, "arrays": [["logits", V], ["att_x", n], ...], "bytes": M} + the last token's logits, state
// The prompt graph, where the export has one, lives in the same model.json (its nodes beside the step graph's, the
// weights and state inputs shared); its signature is userDefinedMetadata.rwkv_export.signatures.prefill, with the
// same keys (`tokens` for `token`). TF.js runs only the nodes the requested outputs need, so each call runs one graph.
// Every name is resolved through model.json's `signature` (logical name -> tensor), never by position: inputs are the
// signature's input keys, the logits are the output whose key is "logits" and each state `s` comes back from the
// output `${s}_out`. The first line written is {"ready": true, ...} or {"error": "..."}; stdout carries nothing else.
// An error answers {"error": "..."} (no bytes follow); a request whose bytes could not be read ends the process.
// The weights are decoded by decodeWeights below (the same float32 values as TF.js's own decoder, faster); DECODER
// "tfjs" decodes them with TF.js's tf.io.decodeWeights instead (tests/test_tfjs_node_speed.py compares the two).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

// TF.js greets Node users on the console; keep stdout for the protocol.
for (const k of ['log', 'info', 'warn', 'debug']) console[k] = (...a) => process.stderr.write(a.join(' ') + '\n');

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
// an answer with float32 arrays after its line: `arrays` [[name, Float32Array], ...]
function replyArrays(obj, arrays) {
  const bytes = arrays.reduce((n, [, a]) => n + a.byteLength, 0);
  process.stdout.write(JSON.stringify({ ...obj, arrays: arrays.map(([k, a]) => [k, a.length]), bytes }) + '\n');
  for (const [, a] of arrays) process.stdout.write(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
}
const LOGITS = 'logits';
const HIDDEN = 'hidden';  // the --embedding output (rwkv_export/embed.py), when the signature has it
const stateOut = (s) => `${s}_out`;

// stdin as lines and byte runs: the request line, then the bytes it announces
class Input {
  constructor(stream) {
    this.it = stream[Symbol.asyncIterator]();
    this.buf = Buffer.alloc(0);
    this.done = false;
  }

  async more() {
    const { value, done } = await this.it.next();
    if (done) { this.done = true; return false; }
    this.buf = this.buf.length ? Buffer.concat([this.buf, value]) : value;
    return true;
  }

  async line() {  // the next line without its newline; null at the end of input
    for (let from = 0; ; ) {
      const i = this.buf.indexOf(10, from);
      if (i >= 0) {
        const s = this.buf.toString('utf8', 0, i);
        this.buf = this.buf.subarray(i + 1);
        return s;
      }
      from = this.buf.length;
      if (!(await this.more())) return this.buf.length ? this.takeRest() : null;
    }
  }

  takeRest() {
    const s = this.buf.toString('utf8');
    this.buf = Buffer.alloc(0);
    return s;
  }

  async bytes(n) {  // n bytes, copied into an ArrayBuffer of their own (so float32 views are aligned)
    while (this.buf.length < n) {
      if (!(await this.more())) throw new Error(`input ended ${n - this.buf.length} bytes short of a request`);
    }
    const out = new Uint8Array(n);
    out.set(this.buf.subarray(0, n));
    this.buf = this.buf.subarray(n);
    return out.buffer;
  }
}

// One shard file as an ArrayBuffer of its own (readFileSync may hand back a view into a larger pooled buffer).
function readShard(path) {
  const b = readFileSync(path);
  return b.byteOffset === 0 && b.byteLength === b.buffer.byteLength
    ? b.buffer : b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
}

async function load(modelPath) {
  // the packages' CommonJS entries, resolved from PACKAGES_DIR (one tfjs-core instance for all three)
  const packages = resolve(process.argv[3] || dirname(fileURLToPath(import.meta.url)));
  const require = createRequire(join(packages, 'package.json'));
  const tf = require('@tensorflow/tfjs-core');
  require('@tensorflow/tfjs-backend-cpu');
  const tfconv = require('@tensorflow/tfjs-converter');
  const fallback = await pickBackend(tf, require, process.argv[4] || 'wasm');
  const json = JSON.parse(readFileSync(modelPath, 'utf8'));
  const dir = dirname(modelPath);
  const weightSpecs = [];
  const shards = [];
  for (const group of json.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) shards.push(readShard(join(dir, p)));
  }
  // The shards as they are (TF.js slices each weight out of the list, as it does with fetched shards): no
  // concatenated copy of them. The model keeps the artifacts it was loaded from; once it has decoded the weights the
  // shards are dropped from them, so that the process holds the float32 weights alone (at 169M shapes a fp32 model's
  // Node process peaked at 2.7 GB with the concatenation kept, 1.4 GB without).
  const artifacts = {
    modelTopology: json.modelTopology, weightSpecs, weightData: shards, format: json.format,
    generatedBy: json.generatedBy, convertedBy: json.convertedBy, signature: json.signature,
  };
  const asked = process.argv[5] || 'fast';
  if (asked !== 'fast' && asked !== 'tfjs') throw new Error(`unknown weight decoder ${asked} (fast or tfjs)`);
  const decoder = asked === 'fast' && fastDecodable(weightSpecs) ? 'fast' : 'tfjs';
  const io = decoder === 'fast' ? { ...tf.io, decodeWeights: (data, specs) => decodeWeights(tf, data, specs) } : tf.io;
  const model = await tfconv.loadGraphModel({ load: async () => artifacts }, {}, io);
  shards.length = 0;
  delete artifacts.weightData;
  const sig = json.signature;
  if (!sig || !sig.inputs || !sig.outputs) throw new Error(`${modelPath} has no signature`);
  if (!sig.inputs.token || !sig.outputs[LOGITS]) throw new Error('signature lacks "token" or "logits"');
  const states = Object.keys(sig.inputs).filter((k) => k !== 'token');
  for (const s of states) if (!sig.outputs[stateOut(s)]) throw new Error(`signature lacks output ${stateOut(s)}`);
  const shape = (spec) => (spec.tensorShape.dim || []).map((d) => Number(d.size));
  const outNames = [sig.outputs[LOGITS].name, ...states.map((s) => sig.outputs[stateOut(s)].name)];
  const hasHidden = Boolean(sig.outputs[HIDDEN]);
  if (hasHidden) outNames.push(sig.outputs[HIDDEN].name);
  const tokenDtype = sig.inputs.token.dtype === 'DT_INT32' ? 'int32' : 'float32';
  const seqSig = json.userDefinedMetadata?.rwkv_export?.signatures?.prefill ?? null;
  if (seqSig) {
    if (!seqSig.inputs.tokens || !seqSig.outputs[LOGITS]) {
      throw new Error('the prefill signature lacks "tokens" or "logits"');
    }
    for (const s of states) {
      if (!seqSig.inputs[s] || !seqSig.outputs[stateOut(s)]) throw new Error(`the prefill signature lacks state ${s}`);
    }
  }

  // one step: token (int) + state (name -> Float32Array) -> {logits, state}
  function step(token, state) {
    const feeds = { [sig.inputs.token.name]: tf.tensor([token], shape(sig.inputs.token), tokenDtype) };
    for (const s of states) feeds[sig.inputs[s].name] = tf.tensor(state[s], shape(sig.inputs[s]), 'float32');
    const outs = model.execute(feeds, outNames);
    const vals = outs.map((t) => t.dataSync());
    for (const t of [...Object.values(feeds), ...outs]) t.dispose();
    const next = {};
    states.forEach((s, i) => { next[s] = vals[i + 1]; });
    return { logits: vals[0], state: next, hidden: hasHidden ? vals[states.length + 1] : undefined };
  }
  // one prompt chunk: tokens (ints) + state -> {logits of the last token, state}
  const vocab = shape(sig.outputs[LOGITS]).at(-1);
  function prefill(tokens, state) {
    if (!seqSig) throw new Error('this model.json has no prompt graph (no prefill signature)');
    const feeds = { [seqSig.inputs.tokens.name]: tf.tensor(tokens, [tokens.length], 'int32') };
    for (const s of states) feeds[seqSig.inputs[s].name] = tf.tensor(state[s], shape(seqSig.inputs[s]), 'float32');
    const names = [seqSig.outputs[LOGITS].name, ...states.map((s) => seqSig.outputs[stateOut(s)].name)];
    const outs = model.execute(feeds, names);
    const vals = outs.map((t) => t.dataSync());
    for (const t of [...Object.values(feeds), ...outs]) t.dispose();
    const next = {};
    states.forEach((s, i) => { next[s] = vals[i + 1]; });
    return { logits: vals[0].slice(vals[0].length - vocab), state: next };
  }
  const hasPrefill = Boolean(seqSig);
  const sizes = states.map((s) => shape(sig.inputs[s]).reduce((a, b) => a * b, 1));
  return {
    step, prefill, states, sizes, hasHidden, hasPrefill, backend: tf.getBackend(), version: tf.version_core, fallback,
    decoder,
    simd: tf.getBackend() === 'wasm' ? await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') : undefined,
  };
}

// The weights as decodeWeights reads them: unquantized float32 / int32, and float32 quantized to float16, uint8 or
// uint16; a model with anything else (strings, int32 from uint8, ...) is left to tf.io.decodeWeights whole.
function fastDecodable(specs) {
  return specs.every((w) => (w.quantization
    ? w.dtype === 'float32' && ['float16', 'uint8', 'uint16'].includes(w.quantization.dtype)
    : w.dtype === 'float32' || w.dtype === 'int32'));
}

// tf.io.decodeWeights' weight map, with the same values, without its costs: it copies every weight out of the
// shards before decoding it (CompositeArrayBuffer.slice) and decodes float16 with three table lookups and an add a
// value (1.5 s of a fp16 169M model's 3 s load). Here each code is looked up in a table of the float32 bit
// patterns that tf.io.decodeWeights itself gives for every possible code (65536 float16 ones, shared; 2^8 or 2^16
// per uint8/uint16 weight, whose min and scale differ), so every value is TF.js's own by construction, whatever
// rounding its decoder does; unquantized weights are views of the shard where they lie within one (the wasm backend
// copies them into its heap; the cpu backend keeps the array it is given, so it gets a copy, as from TF.js).
function decodeWeights(tf, data, specs) {
  const shards = Array.isArray(data) ? data : [data];
  const starts = [];
  let total = 0;
  for (const b of shards) { starts.push(total); total += b.byteLength; }
  const view = tf.getBackend() === 'wasm';  // the backend copies what it is given
  let at = 0;
  let k = 0;  // the shard holding byte `at`
  let first = 0, released = 0;  // wasm: the first shard not let go yet, and the bytes let go since the last collection
  // bytes [at, at + n) as a Uint8Array: a view where they lie in one shard, else a copy of them
  const bytesAt = (n) => {
    if (at + n > total) throw new Error(`the weights take more than the ${total} bytes of the shards`);
    while (k + 1 < shards.length && at >= starts[k + 1]) k++;
    const off = at - starts[k];
    if (off + n <= shards[k].byteLength) return new Uint8Array(shards[k], off, n);
    const out = new Uint8Array(n);
    for (let j = k, filled = 0; filled < n; j++) {
      const from = j === k ? off : 0;
      const take = Math.min(n - filled, shards[j].byteLength - from);
      out.set(new Uint8Array(shards[j], from, take), filled);
      filled += take;
    }
    return out;
  };
  // a typed array of `Type` over the bytes `u8`: the same memory where it is aligned (and may be kept), else a copy
  const typed = (Type, u8, keep) => (keep && u8.byteOffset % Type.BYTES_PER_ELEMENT === 0
    ? new Type(u8.buffer, u8.byteOffset, u8.byteLength / Type.BYTES_PER_ELEMENT)
    : new Type(u8.slice().buffer));
  // TF.js's float32 for each code 0 .. 2^bits - 1 of quantization `q`, as tf.io.decodeWeights gives them
  const codebook = (q, bits) => {
    const codes = bits === 8 ? new Uint8Array(256) : new Uint16Array(65536);
    for (let c = 0; c < codes.length; c++) codes[c] = c;
    const spec = { name: 'c', shape: [codes.length], dtype: 'float32', quantization: q };
    const t = tf.io.decodeWeights(codes.buffer, [spec]).c;
    const f = t.dataSync();
    const table = new Uint32Array(f.buffer, f.byteOffset, f.length).slice();  // the bits, never a float copy
    t.dispose();
    return table;
  };
  const half = codebook({ dtype: 'float16' }, 16);
  let scratch = new Uint32Array(0);  // wasm: one buffer for every decoded weight (the backend copies it)
  const out = {};
  for (const w of specs) {
    const size = w.shape.reduce((a, b) => a * b, 1);
    const q = w.quantization;
    let values;
    if (!q) {
      values = typed(w.dtype === 'int32' ? Int32Array : Float32Array, bytesAt(size * 4), view);
      at += size * 4;
    } else {
      const bits = q.dtype === 'uint8' ? 8 : 16;
      const codes = typed(bits === 8 ? Uint8Array : Uint16Array, bytesAt(size * bits / 8), true);
      at += size * bits / 8;
      const table = q.dtype === 'float16' ? half : codebook(q, bits);
      if (view && scratch.length < size) scratch = new Uint32Array(size);
      const bitsOut = view ? scratch.subarray(0, size) : new Uint32Array(size);
      (bits === 8 ? lookup8 : lookup16)(codes, table, bitsOut);
      values = new Float32Array(bitsOut.buffer, 0, size);
    }
    out[w.name] = tf.tensor(values, w.shape, w.dtype);
    if (view) release(at);
  }
  return out;

  // wasm: the backend has copied every weight before byte `upto` into its heap, so the shards wholly before it are
  // let go (their entries in `data`, the artifacts' list, too) and collected where Node runs with --expose-gc: the
  // shards and the heap's copy are not both held whole (a fp32 169M model's process peaked at 1.55 GB, 1.28 GB
  // once loaded and packed)
  function release(upto) {
    for (; first < shards.length && (first + 1 < shards.length ? starts[first + 1] : total) <= upto; first++) {
      released += shards[first].byteLength;
      shards[first] = null;  // `data` (the artifacts' list) is this very array
    }
    if (released >= GC_BYTES && typeof globalThis.gc === 'function') {
      globalThis.gc();
      released = 0;
    }
  }
}
const GC_BYTES = 64 * 2 ** 20;  // collect after this many bytes of shards are let go

// out[i] = table[codes[i]], one function per code type so that each loop sees one kind of array (one loop for both
// took 0.77 s against 0.67 s on a fp16 169M model, under the profiler)
function lookup8(codes, table, out) {
  for (let i = 0; i < out.length; i++) out[i] = table[codes[i]];
}
function lookup16(codes, table, out) {
  for (let i = 0; i < out.length; i++) out[i] = table[codes[i]];
}

// Sets the backend `want` ("wasm" or "cpu"); returns null, or why wasm could not initialise (cpu is then in use).
async function pickBackend(tf, require, want) {
  if (want !== 'wasm' && want !== 'cpu') throw new Error(`unknown backend ${want} (wasm or cpu)`);
  if (want === 'wasm') {
    let why;
    try {
      const entry = require.resolve('@tensorflow/tfjs-backend-wasm');
      const wasm = require('@tensorflow/tfjs-backend-wasm');
      // the binaries beside the package's Node entry (dist/), read from disk: no fetch at run time
      wasm.setWasmPaths(dirname(entry) + '/');
      if (await tf.setBackend('wasm')) {
        await tf.ready();
        return null;
      }
      why = 'tf.setBackend("wasm") returned false';
    } catch (e) {
      why = String(e?.message ?? e).split('\n')[0];
    }
    await tf.setBackend('cpu');
    await tf.ready();
    return why;
  }
  await tf.setBackend('cpu');
  await tf.ready();
  return null;
}

function argmax(a) {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

const modelPath = process.argv[2];
let m;
try {
  m = await load(modelPath);
} catch (e) {
  reply({ error: `cannot load ${modelPath}: ${e.message.split('\n')[0]}` });
  process.exit(1);
}
reply({
  ready: true, backend: m.backend, tfjs: m.version, states: m.states, sizes: m.sizes, hidden: m.hasHidden,
  prefill: m.hasPrefill, simd: m.simd, fallback: m.fallback, decoder: m.decoder,
});

// the request's state bytes (the ready line's `states`, in order) as name -> Float32Array
function readState(buffer) {
  const need = m.sizes.reduce((a, b) => a + b, 0) * 4;
  if (buffer.byteLength !== need) {
    throw new Error(`request has ${buffer.byteLength} state bytes, the states take ${need}`);
  }
  const st = {};
  let at = 0;
  m.states.forEach((s, i) => { st[s] = new Float32Array(buffer, at, m.sizes[i]); at += m.sizes[i] * 4; });
  return st;
}
const stateArrays = (st) => m.states.map((s) => [s, st[s]]);

const input = new Input(process.stdin);
for (;;) {
  const line = await input.line();
  if (line === null) break;
  if (!line.trim()) continue;
  let req;
  let payload;
  try {
    req = JSON.parse(line);
    // the bytes are read before anything can fail, so that the next request line is where it should be
    payload = await input.bytes(Number(req.bytes) || 0);
  } catch (e) {
    reply({ error: `unreadable request: ${e.message.split('\n')[0]}` });
    process.exit(1);
  }
  try {
    if (req.op === 'step') {
      const r = m.step(req.token, readState(payload));
      const arrays = [['logits', r.logits], ...stateArrays(r.state)];
      if (r.hidden) arrays.push(['hidden', r.hidden]);
      replyArrays({}, arrays);
    } else if (req.op === 'greedy') {
      let state = readState(payload);
      let tok = req.token;
      const tokens = [];
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < req.n; i++) {
        const r = m.step(tok, state);
        state = r.state;
        tok = argmax(r.logits);
        tokens.push(tok);
      }
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      replyArrays({ tokens, seconds, rss_mb: process.memoryUsage().rss / 2 ** 20 }, stateArrays(state));
    } else if (req.op === 'prefill') {
      const t0 = process.hrtime.bigint();
      const r = m.prefill(req.tokens, readState(payload));
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      replyArrays({ seconds }, [['logits', r.logits], ...stateArrays(r.state)]);
    } else {
      reply({ error: `unknown op ${req.op}` });
    }
  } catch (e) {
    reply({ error: e.message.split('\n')[0] });
  }
}
