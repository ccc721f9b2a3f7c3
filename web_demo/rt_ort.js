// onnxruntime-web adapter for runtimes.html (see rt_common.js for the runner interface): the ONNX step graph (and the
// prompt graph, kind "sequence", where the folder has one) on the wasm or WebGPU execution provider. The state goes
// through the CPU at every run (onnxruntime's output tensors are the next run's inputs): the plain way, the same on
// both backends; index.html's worker keeps the state on the GPU (session_io.js), which is faster on WebGPU.

import { ioByRole } from './manifest.js';
import { NPM, RuntimeLimit, fetchFiles, initialState, lastRow, webgpuAdapter } from './rt_common.js';

export const BACKENDS = ['wasm', 'webgpu'];
const ORT_BASE = `${NPM}onnxruntime-web/dist/`;

function tokenTensor(ort, io, ids) {
  const spec = io.token;
  const data = spec.dtype === 'int64' ? BigInt64Array.from(ids, (x) => BigInt(x)) : Int32Array.from(ids);
  const shape = spec.shape.map((d) => (typeof d === 'number' ? d : ids.length));
  return new ort.Tensor(spec.dtype, data, shape.length ? shape : [ids.length]);
}

export async function open({ manifest, modelBase, graph, seq, backend, threads, verify }) {
  if (!BACKENDS.includes(backend)) throw new RuntimeLimit(`onnxruntime-web has no backend '${backend}' (has ${BACKENDS.join(', ')})`);
  if (backend === 'webgpu') {
    const probe = await webgpuAdapter();
    if (!probe.ok) throw new RuntimeLimit(`WebGPU is not available: ${probe.why}`);
  }
  const ort = await import(`${ORT_BASE}${backend === 'webgpu' ? 'ort.webgpu.min.mjs' : 'ort.wasm.min.mjs'}`);
  ort.env.logLevel = 'error';
  ort.env.wasm.wasmPaths = new URL(ORT_BASE, location.href).href;
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = false;
  const graphs = seq ? [graph, seq] : [graph];
  const files = await fetchFiles(manifest, modelBase, graphs, verify);
  const bytes = [...files.values()].reduce((n, b) => n + b.length, 0);
  const session = async (g) => {
    const dir = g.file.includes('/') ? g.file.slice(0, g.file.lastIndexOf('/') + 1) : '';
    const externalData = (g.data_files || []).map((f) => ({ path: f.slice(dir.length), data: files.get(f) }));
    try {
      return await ort.InferenceSession.create(files.get(g.file), {
        executionProviders: [backend], graphOptimizationLevel: 'all', ...(externalData.length ? { externalData } : {}),
      });
    } catch (e) {
      const big = bytes > 1.2e9 ? ' onnxruntime-web copies the weights into its wasm memory (4 GB at most): use int8 or int4.' : '';
      throw new RuntimeLimit(`onnxruntime-web cannot open ${g.file} on ${backend}: ${e.message}.${big}`);
    }
  };
  const parts = [{ graph, io: ioByRole(graph, manifest), session: await session(graph) }];
  if (seq) parts.push({ graph: seq, io: ioByRole(seq, manifest), session: await session(seq) });
  files.clear();
  const vocab = manifest.model.vocab_size;
  const fresh = () => Object.fromEntries(Object.entries(initialState(manifest, parts[0].io))
    .map(([n, a]) => [n, new ort.Tensor('float32', a, parts[0].io.stateIn.get(n).shape)]));
  let state = fresh();
  const run = async (part, ids) => {
    const feeds = { [part.io.token.name]: tokenTensor(ort, part.io, ids) };
    for (const [n, spec] of part.io.stateIn) feeds[spec.name] = state[n];
    const out = await part.session.run(feeds);
    for (const [n, spec] of part.io.stateOut) state[n] = out[spec.name];
    return lastRow(out[part.io.logits.name].data, vocab);
  };
  const p = parts[1];
  return {
    backend, threads: backend === 'wasm' ? threads : null, bytes, notes: [],
    promptInfo: p ? { graph: p.graph.file, chunk: Number.isInteger(p.graph.max_chunk) ? p.graph.max_chunk : null, fixed: false } : null,
    reset() { state = fresh(); },
    step: (id) => run(parts[0], [id]),
    prompt: p ? (ids) => run(p, ids) : null,
    wasmBytes: () => null,
    async dispose() { for (const x of parts) await x.session.release().catch(() => {}); },
  };
}
