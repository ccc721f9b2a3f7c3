// tfjs-tflite adapter for runtimes.html (runner interface: rt_common.js): the exported .tflite (`rwkv-export tflite`)
// in the TFLite web runtime (TFLite compiled to wasm with XNNPACK; SIMD and threads where the page allows them).
// It runs the model's first subgraph through tfjs-tflite's model runner: inputs are written into and outputs read
// from the interpreter's own tensors (no tf.Tensor per step), the state copied from outputs to inputs each step.

import { ioByRole } from './manifest.js';
import { NPM, RuntimeLimit, fetchFiles, initialState, lastRow, loadScript } from './rt_common.js';

export const BACKENDS = ['wasm'];
const WASM_DIR = `${NPM}@tensorflow/tfjs-tflite/wasm/`;
export const NO_PREFILL = "tfjs-tflite's model runner runs a model's first subgraph only (it has no signature API), " +
  "so the `prefill` signature cannot be called and a prompt runs token by token.";
export const PREFILL_FIX = 'write the prefill signature as a separate .tflite (its own file, first subgraph) in ' +
  'rwkv_export/targets/tflite.py, at the cost of a second copy of the weights.';

// The interpreter's tensor for a manifest I/O name: litert-torch names them `<signature>_<name>` (inputs) and
// `<signature>_<name>_output` (outputs).
function byName(list, signature, name, out) {
  const want = [out ? `${signature}_${name}_output` : `${signature}_${name}`, name, `${name}:0`];
  for (const w of want) {
    const t = list.find((x) => x.name === w);
    if (t) return t;
  }
  throw new RuntimeLimit(`the .tflite's first subgraph has no tensor for '${name}' (has ${list.map((x) => x.name).join(', ')})`);
}

// The TFLite runtime says why a run failed only on the console ("ERROR: ..."): keep its last error lines.
const tfliteErrors = [];
for (const k of ['log', 'warn', 'error']) {
  const orig = console[k].bind(console);
  console[k] = (...args) => {
    const line = args.join(' ');
    if (line.startsWith('ERROR:') && tfliteErrors.push(line) > 3) tfliteErrors.shift();
    orig(...args);
  };
}

export async function open({ manifest, modelBase, graph, seq, backend, threads, verify }) {
  if (!BACKENDS.includes(backend)) throw new RuntimeLimit(`tfjs-tflite runs on wasm only (XNNPACK on the CPU), not '${backend}'`);
  await loadScript(`${NPM}@tensorflow/tfjs-core/dist/tf-core.min.js`);
  await loadScript(`${NPM}@tensorflow/tfjs-backend-cpu/dist/tf-backend-cpu.min.js`);
  // Its TFLite wasm module's URL is resolved against the script's own folder, and the threaded module's workers load
  // it from there too: dist/ has no such file (they lie in wasm/), so the script is told it lives in wasm/.
  await loadScript(`${NPM}@tensorflow/tfjs-tflite/dist/tf-tflite.min.js`, `${WASM_DIR}tf-tflite.min.js`);
  const tflite = self.tflite;
  tflite.setWasmPath(new URL(WASM_DIR, location.href).href);
  const files = await fetchFiles(manifest, modelBase, [graph], verify);
  const bytes = files.get(graph.file);
  let model;
  try {
    model = await tflite.loadTFLiteModel(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), { numThreads: threads });
  } catch (e) {
    throw new RuntimeLimit(`the TFLite web runtime cannot open ${graph.file}: ${e.message ?? e}` +
      ' (an op or op version newer than its TFLite build?)');
  }
  const runner = model.modelRunner;
  const io = ioByRole(graph, manifest);
  const sig = graph.signature ?? 'step';
  const ins = runner.getInputs();
  const outs = runner.getOutputs();
  if (ins.length !== 1 + io.stateIn.size) {
    throw new RuntimeLimit(`the first subgraph of ${graph.file} has ${ins.length} inputs, not the step signature's ${1 + io.stateIn.size}`);
  }
  const tokenT = byName(ins, sig, io.token.name, false);
  const logitsT = byName(outs, sig, io.logits.name, true);
  const pairs = [...io.stateIn].map(([n, spec]) => [byName(ins, sig, spec.name, false), byName(outs, sig, io.stateOut.get(n).name, true), n]);
  const vocab = manifest.model.vocab_size;
  const reset = () => {
    const init = initialState(manifest, io);
    for (const [inT, , n] of pairs) inT.data().set(init[n]);
  };
  reset();
  const step = (id) => {
    tokenT.data()[0] = id;
    tfliteErrors.length = 0;
    if (!runner.infer()) {
      throw new RuntimeLimit(`the TFLite web runtime failed to run ${graph.file}` +
        (tfliteErrors.length ? ` (${tfliteErrors.join('; ')})` : ''));
    }
    for (const [inT, outT] of pairs) inT.data().set(outT.data());
    return lastRow(logitsT.data(), vocab).slice();
  };
  return {
    backend: 'wasm', threads, bytes: bytes.length, notes: seq ? [`${NO_PREFILL} Fix: ${PREFILL_FIX}`] : [], promptInfo: null, prompt: null,
    reset, step, wasmBytes: () => null,
    async dispose() { runner.cleanUp?.(); },
  };
}
