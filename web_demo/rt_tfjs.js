// TF.js adapter for runtimes.html (runner interface: rt_common.js): the exported graph model (`rwkv-export tfjs`:
// model.json + weight shards, a `signature` mapping logical names to tensors) on one of TF.js's backends. The state
// stays in the backend's tensors from step to step (on webgl/webgpu it never leaves the GPU); only the logits are read.
// The prompt graph (manifest kind "sequence", where the folder has one) lives in the same model.json: one model, one
// copy of the weights; a prompt call feeds 1..max_chunk tokens and reads the prompt graph's outputs by their tensors.
// TF.js's packages are UMD builds (a global `tf`), loaded from the npm folders `rwkv-export serve` serves.

import { ioByRole } from './manifest.js';
import { NPM, RuntimeLimit, fetchFiles, initialState, lastRow, loadScript, webgpuAdapter } from './rt_common.js';

export const BACKENDS = ['wasm', 'webgl', 'webgpu', 'cpu'];
const PKG = (name, file) => `${NPM}@tensorflow/tfjs-${name}/dist/${file}`;
const BACKEND_SCRIPT = { cpu: 'backend-cpu', wasm: 'backend-wasm', webgl: 'backend-webgl', webgpu: 'backend-webgpu' };
export const NO_PROMPT_GRAPH = 'this TF.js export has only the step graph (exported with --no-prefill or --embedding, ' +
  'or before the prompt graph), so a prompt runs token by token.';
export const PROMPT_FIX = 're-export with `rwkv-export tfjs` (its model.json then holds the prompt graph beside the step ' +
  'graph: a manifest entry of kind "sequence", signature "prefill").';

// The TF.js core, converter and the backend's package, once per page; then the backend, set up.
export async function tfWithBackend(backend, threads) {
  await loadScript(PKG('core', 'tf-core.min.js'));
  await loadScript(PKG('backend-cpu', 'tf-backend-cpu.min.js')); // tf.tensor() etc. need a CPU backend registered
  await loadScript(PKG('converter', 'tf-converter.min.js'));
  await loadScript(PKG(BACKEND_SCRIPT[backend], `tf-${BACKEND_SCRIPT[backend]}.min.js`));
  const tf = self.tf;
  if (backend === 'wasm') {
    tf.wasm.setWasmPaths(new URL(`${NPM}@tensorflow/tfjs-backend-wasm/dist/`, location.href).href);
    tf.wasm.setThreadsCount(threads);
  }
  if (backend === 'webgpu') {
    const probe = await webgpuAdapter();
    if (!probe.ok) throw new RuntimeLimit(`WebGPU is not available: ${probe.why}`);
  }
  let ok = false;
  try {
    ok = await tf.setBackend(backend);
  } catch (e) {
    throw new RuntimeLimit(`TF.js could not start its ${backend} backend: ${e.message}`);
  }
  if (!ok || tf.getBackend() !== backend) throw new RuntimeLimit(`TF.js could not start its ${backend} backend (unavailable in this browser)`);
  await tf.ready();
  return tf;
}

function backendNotes(tf, backend) {
  if (backend === 'wasm') {
    const n = tf.wasm.getThreadsCount();
    return [`wasm: ${n} thread${n === 1 ? '' : 's'}${self.crossOriginIsolated ? '' : ' (not cross-origin isolated: no threads)'}`];
  }
  if (backend === 'webgl') {
    const f32 = tf.env().getBool('WEBGL_RENDER_FLOAT32_ENABLED');
    return [`webgl ${tf.env().getNumber('WEBGL_VERSION')}: ${f32 ? 'float32' : 'float16 (no float32 render targets: not fp32)'} textures`];
  }
  return [];
}

export async function open({ manifest, modelBase, graph, seq, backend, threads, verify }) {
  if (!BACKENDS.includes(backend)) throw new RuntimeLimit(`TF.js has no backend '${backend}' here (has ${BACKENDS.join(', ')})`);
  const tf = await tfWithBackend(backend, threads);
  const files = await fetchFiles(manifest, modelBase, [graph], verify);
  const bytes = [...files.values()].reduce((n, b) => n + b.length, 0);
  const json = JSON.parse(new TextDecoder().decode(files.get(graph.file)));
  const dir = graph.file.includes('/') ? graph.file.slice(0, graph.file.lastIndexOf('/') + 1) : '';
  const weightSpecs = json.weightsManifest.flatMap((g) => g.weights);
  const shards = json.weightsManifest.flatMap((g) => g.paths).map((p) => files.get(dir + p));
  const weightData = new Uint8Array(shards.reduce((n, s) => n + s.length, 0));
  shards.reduce((o, s) => { weightData.set(s, o); return o + s.length; }, 0);
  files.clear();
  let model;
  try {
    model = await tf.loadGraphModel(tf.io.fromMemory({
      modelTopology: json.modelTopology, weightSpecs, weightData: weightData.buffer, format: json.format,
      generatedBy: json.generatedBy, convertedBy: json.convertedBy, signature: json.signature,
    }));
  } catch (e) {
    throw new RuntimeLimit(`TF.js (${backend}) cannot load ${graph.file}: ${e.message}`);
  }
  const io = ioByRole(graph, manifest);
  const vocab = manifest.model.vocab_size;
  const tensorOf = (spec) => spec.tensor ?? json.signature.inputs[spec.name]?.name ?? json.signature.outputs[spec.name]?.name;
  const stateOrder = [...io.stateOut.keys()];
  const outNames = [tensorOf(io.logits), ...stateOrder.map((n) => tensorOf(io.stateOut.get(n)))];
  // the prompt graph, when it is in this model.json (its entry names each input/output's tensor)
  const seqIo = seq && seq.file === graph.file ? ioByRole(seq, manifest) : null;
  const seqOut = seqIo && [seqIo.logits.tensor, ...stateOrder.map((n) => seqIo.stateOut.get(n).tensor)];
  let state = null;
  const reset = () => {
    if (state) for (const t of Object.values(state)) t.dispose();
    state = Object.fromEntries(Object.entries(initialState(manifest, io))
      .map(([n, a]) => [n, tf.tensor(a, io.stateIn.get(n).shape, 'float32')]));
  };
  reset();
  // one graph call: the token(s) and the state in, the logits read and the state kept as tensors
  const run = async (part, names, ids, what) => {
    const token = tf.tensor(ids, [ids.length], 'int32');
    const feeds = { [tensorOf(part.token)]: token };
    for (const [n, spec] of part.stateIn) feeds[tensorOf(spec)] = state[n];
    let outs;
    try {
      outs = model.execute(feeds, names);
    } catch (e) {
      token.dispose();
      throw new RuntimeLimit(`TF.js (${backend}) cannot run ${what}: ${e.message}`);
    }
    token.dispose();
    for (const t of Object.values(state)) t.dispose();
    state = Object.fromEntries(stateOrder.map((n, i) => [n, outs[i + 1]]));
    const logits = await outs[0].data();
    outs[0].dispose();
    return lastRow(logits, vocab);
  };
  const step = (id) => run(io, outNames, [id], graph.file);
  const prompt = seqIo && ((ids) => run(seqIo, seqOut, ids, `${seq.file}'s prompt graph`));
  const notes = [...backendNotes(tf, backend)];
  if (!seqIo) {
    notes.push(seq ? `the prompt graph ${seq.file} is not in ${graph.file}, so a prompt runs token by token.`
      : `${NO_PROMPT_GRAPH} Fix: ${PROMPT_FIX}`);
  }
  return {
    backend, threads: backend === 'wasm' ? tf.wasm.getThreadsCount() : null, bytes, notes,
    promptInfo: seqIo ? { graph: `${seq.file} (${seq.signature ?? 'prefill'})`, chunk: seq.max_chunk, fixed: false } : null,
    prompt, reset, step,
    wasmBytes: () => (backend === 'wasm' ? tf.backend().wasm?.HEAPU8?.buffer.byteLength ?? null : null),
    async dispose() { if (state) for (const t of Object.values(state)) t.dispose(); state = null; model.dispose(); },
  };
}
