// tfjs-tflite adapter for runtimes.html (runner interface: rt_common.js): the exported .tflite (`rwkv-export tflite`)
// in the TFLite web runtime (TFLite compiled to wasm with XNNPACK; SIMD and threads where the page allows them).
// It runs a file's first subgraph through tfjs-tflite's model runner: the step graph's file for single tokens and,
// where the folder has it, the prompt graph's file for whole chunks of a prompt. Inputs are written into and outputs
// read from the interpreter's own tensors (no tf.Tensor per step), the state copied from outputs to inputs.

import { graphBytes, ioByRole } from './manifest.js';
import { NPM, RuntimeLimit, fetchFiles, initialState, lastRow, loadScript } from './rt_common.js';

export const BACKENDS = ['wasm'];
const WASM_DIR = `${NPM}@tensorflow/tfjs-tflite/wasm/`;

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

// One .tflite in the TFLite web runtime: {runner, bytes}. Its model runner runs the file's first subgraph, which is why
// the exporter writes the step and the prompt graph as files of one signature each.
async function loadModel(tflite, manifest, modelBase, graph, threads, verify) {
  const files = await fetchFiles(manifest, modelBase, [graph], verify);
  const bytes = files.get(graph.file);
  tfliteErrors.length = 0;
  try {
    const model = await tflite.loadTFLiteModel(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), { numThreads: threads });
    return { runner: model.modelRunner, bytes: bytes.length };
  } catch (e) {
    // what the runtime printed while it read the file names the op or type it lacks; without that, the likely causes
    const said = [...new Set(tfliteErrors)];
    const why = String(e.message ?? e).replace(/\.+$/, '');
    let hint = said.length ? ` The runtime said: ${said.join('; ')}.`
      : ' (no reason printed: an op or op version newer than its TFLite build, or more memory than its wasm heap has).';
    if (!said.length && /Aborted/.test(why) && graph.variant === 'fp16') {
      hint = ' It aborts while it opens the file and prints no reason. Not the ops: smaller fp16 files open and run' +
        " (measured: tiny-pydoc, and 4 of 169M's 12 layers, 216 MB). The size, then: most likely memory, since the" +
        ` fp16 weights become fp32 copies when the file is opened (twice the file's ${(bytes.length / 1e6).toFixed(0)}` +
        " MB, beside the file and XNNPACK's packed copy) and this runtime's wasm memory holds 2 GB at most.";
    }
    throw new RuntimeLimit(`the TFLite web runtime cannot open ${graph.file}: ${why}.${hint}`, limitFix(graph, said));
  }
}

// The exporter change (or variant) that would let this build open the file, where one is known.
function limitFix(graph, said) {
  if (said.some((l) => /Unsupported data type 17/.test(l))) { // 17: TensorType INT4 in the TFLite schema
    return 'use the int8 variant (`rwkv-export tflite --quant int8`): this TFLite build predates int4 tensors (type 17).';
  }
  if (graph.variant === 'fp16') return 'use the int8 variant (one byte per weight, kept as int8 when opened) or fp32.';
  return null;
}

// A graph's I/O as the interpreter's tensors: {token, logits, states: [[inTensor, outTensor, stateName]]}.
function bindTensors(runner, graph, manifest) {
  const io = ioByRole(graph, manifest);
  const sig = graph.signature ?? 'step';
  const ins = runner.getInputs();
  const outs = runner.getOutputs();
  if (ins.length !== 1 + io.stateIn.size) {
    throw new RuntimeLimit(`the first subgraph of ${graph.file} has ${ins.length} inputs, not the ${sig} signature's ${1 + io.stateIn.size}`);
  }
  return {
    io,
    token: byName(ins, sig, io.token.name, false),
    logits: byName(outs, sig, io.logits.name, true),
    states: [...io.stateIn].map(([n, spec]) => [byName(ins, sig, spec.name, false), byName(outs, sig, io.stateOut.get(n).name, true), n]),
  };
}

function infer(runner, file) {
  tfliteErrors.length = 0;
  if (!runner.infer()) {
    throw new RuntimeLimit(`the TFLite web runtime failed to run ${file}` + (tfliteErrors.length ? ` (${tfliteErrors.join('; ')})` : ''));
  }
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
  let model = await loadModel(tflite, manifest, modelBase, graph, threads, verify);
  let s = bindTensors(model.runner, graph, manifest);
  const vocab = manifest.model.vocab_size;
  // The state lives in the step graph's input tensors: each step copies its outputs back in.
  const reset = () => {
    const init = initialState(manifest, s.io);
    for (const [inT, , n] of s.states) inT.data().set(init[n]);
  };
  const step = (id) => {
    s.token.data()[0] = id;
    infer(model.runner, graph.file);
    for (const [inT, outT] of s.states) inT.data().set(outT.data());
    return lastRow(s.logits.data(), vocab).slice();
  };
  // The prompt graph (its own file): a whole chunk of exactly max_chunk tokens from the step graph's state, into it.
  const notes = [];
  let prefill = null;
  if (!seq) {
    notes.push('this folder has no TFLite prompt graph (exported with --no-prefill): a prompt runs token by token.');
  } else {
    let why = null;
    try {
      const m = await loadModel(tflite, manifest, modelBase, seq, threads, verify);
      prefill = { ...m, ...bindTensors(m.runner, seq, manifest) };
    } catch (e) {
      why = e.message;
    }
    // The runtime's wasm memory holds 2 GB at most: where both graphs' weights (each file's, plus XNNPACK's packed
    // copy) do not fit, the step graph's tensors come back without data (measured: 169M fp32). Then the step graph
    // is loaded again, alone.
    const alive = (b) => ArrayBuffer.isView(b.token.data()) && ArrayBuffer.isView(b.logits.data());
    if (!alive(s) || (prefill && !alive(prefill))) {
      prefill?.runner.cleanUp?.();
      model.runner.cleanUp?.();
      prefill = null;
      model = await loadModel(tflite, manifest, modelBase, graph, threads, verify);
      s = bindTensors(model.runner, graph, manifest);
      why = `the step and prompt graphs together (${((graphBytes(manifest, graph) + graphBytes(manifest, seq)) / 1e6).toFixed(0)} MB ` +
        "of weights, each packed again by XNNPACK) do not fit in the TFLite web runtime's wasm memory (2 GB at most)";
    }
    if (why) notes.push(`the prompt graph ${seq.file} does not run here, so a prompt runs token by token: ${why}.`);
  }
  const prompt = prefill && ((ids) => {
    const stepIn = new Map(s.states.map(([inT, , n]) => [n, inT]));
    prefill.token.data().set(ids);
    for (const [inT, , n] of prefill.states) inT.data().set(stepIn.get(n).data());
    infer(prefill.runner, seq.file);
    for (const [, outT, n] of prefill.states) stepIn.get(n).data().set(outT.data());
    return lastRow(prefill.logits.data(), vocab).slice();
  });
  reset();
  return {
    backend: 'wasm', threads, bytes: model.bytes + (prefill?.bytes ?? 0), notes,
    promptInfo: prefill ? { graph: seq.file, chunk: seq.max_chunk, fixed: true } : null, prompt,
    reset, step, wasmBytes: () => null,
    async dispose() { model.runner.cleanUp?.(); prefill?.runner.cleanUp?.(); },
  };
}
