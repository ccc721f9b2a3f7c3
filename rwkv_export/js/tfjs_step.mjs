// Step server for a TF.js graph model, driven by rwkv_export.tf_runners.TFJSStepRunner (one Node process per runner).
//
//   node tfjs_step.mjs path/to/model.json [PACKAGES_DIR] [BACKEND]
//
// PACKAGES_DIR holds the node_modules installed from this folder's package-lock.json (default: this folder; an
// installed wheel keeps them in the user cache, see rwkv_export/node.py).
// BACKEND is "wasm" (the default: @tensorflow/tfjs-backend-wasm, its SIMD binary, single-threaded: TF.js 4.22 turns
// the wasm backend's threads off under Node) or "cpu" (the pure-JS CPU backend). The .wasm binaries are read from the
// installed package's dist/ folder, never fetched. Where the wasm backend cannot initialise, the driver falls back to
// cpu and says why in its ready line ("fallback"); the Python side reports it, so a fallback is never silent.
// Loads the model with @tensorflow/tfjs on that backend, then answers one JSON line per request line on stdin:
//   {"op": "step", "token": 5, "state": {"att_x": "<base64 float32>", ...}}
//     -> {"logits": "<base64 float32>", "state": {"att_x": "<base64 float32>", ...}}
//        (+ "hidden": "<base64 float32>" when the signature has a `hidden` output: an export made with --embedding)
//   {"op": "greedy", "token": 5, "n": 32, "state": {...}}   (n steps in Node, each feeding back its argmax; timed)
//     -> {"tokens": [...], "seconds": 1.23, "state": {...}, "rss_mb": 1234.5}
//   {"op": "prefill", "tokens": [5, 7, ...], "state": {...}}   (one call of the prompt graph: 1 <= T <= max_chunk)
//     -> {"logits": "<base64 float32, the last token's>", "state": {...}, "seconds": 0.12}
// The prompt graph, where the export has one, lives in the same model.json (its nodes beside the step graph's, the
// weights and state inputs shared); its signature is userDefinedMetadata.rwkv_export.signatures.prefill, with the
// same keys (`tokens` for `token`). TF.js runs only the nodes the requested outputs need, so each call runs one graph.
// Every name is resolved through model.json's `signature` (logical name -> tensor), never by position: inputs are the
// signature's input keys, the logits are the output whose key is "logits" and each state `s` comes back from the
// output `${s}_out`. The first line written is {"ready": true, ...} or {"error": "..."}; stdout carries nothing else.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

// TF.js greets Node users on the console; keep stdout for the protocol.
for (const k of ['log', 'info', 'warn', 'debug']) console[k] = (...a) => process.stderr.write(a.join(' ') + '\n');

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const LOGITS = 'logits';
const HIDDEN = 'hidden';  // the --embedding output (rwkv_export/embed.py), when the signature has it
const stateOut = (s) => `${s}_out`;

function b64ToF32(s) {
  const u8 = Buffer.from(s, 'base64');
  const f = new Float32Array(u8.byteLength / 4);
  new Uint8Array(f.buffer).set(u8);
  return f;
}
const f32ToB64 = (f) => Buffer.from(f.buffer, f.byteOffset, f.byteLength).toString('base64');

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
  const model = await tfconv.loadGraphModel({ load: async () => artifacts });
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
  return {
    step, prefill, states, hasHidden, hasPrefill, backend: tf.getBackend(), version: tf.version_core, fallback,
    simd: tf.getBackend() === 'wasm' ? await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') : undefined,
  };
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
  ready: true, backend: m.backend, tfjs: m.version, states: m.states, hidden: m.hasHidden, prefill: m.hasPrefill,
  simd: m.simd, fallback: m.fallback,
});

const decodeState = (st) => Object.fromEntries(m.states.map((s) => {
  if (!(s in st)) throw new Error(`request lacks state ${s}`);
  return [s, b64ToF32(st[s])];
}));
const encodeState = (st) => Object.fromEntries(m.states.map((s) => [s, f32ToB64(st[s])]));

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  try {
    const req = JSON.parse(line);
    if (req.op === 'step') {
      const r = m.step(req.token, decodeState(req.state));
      const out = { logits: f32ToB64(r.logits), state: encodeState(r.state) };
      if (r.hidden) out.hidden = f32ToB64(r.hidden);
      reply(out);
    } else if (req.op === 'greedy') {
      let state = decodeState(req.state);
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
      reply({ tokens, seconds, state: encodeState(state), rss_mb: process.memoryUsage().rss / 2 ** 20 });
    } else if (req.op === 'prefill') {
      const t0 = process.hrtime.bigint();
      const r = m.prefill(req.tokens, decodeState(req.state));
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      reply({ logits: f32ToB64(r.logits), state: encodeState(r.state), seconds });
    } else {
      reply({ error: `unknown op ${req.op}` });
    }
  } catch (e) {
    reply({ error: e.message.split('\n')[0] });
  }
}
