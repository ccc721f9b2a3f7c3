// The embed page: two texts, their cosine similarity, computed here from an export made with --embedding
// (rwkv_export/embed.py; docs/manifest.md, "Embedding outputs"). Everything comes from the manifest: the graph (the
// prompt graph if the folder has one, else the step graph), its I/O names by role ("tokens"/"token", "state",
// "hidden", "hidden_sum"), the state's shapes and initial values, the tokenizer. onnxruntime-web, wasm, main thread.
//
// URL parameters (optional): model=URL of the export folder (default model/), graph=step|prefill, variant=NAME.
// window.rwkvEmbed (for tests and scripts): status, error, graph, embed(text, pool) -> Float64Array,
// similarity(a, b, pool) -> number.

import { loadTokenizer } from './tokenizer.js';
import { fetchManifest, graphFiles, ioByRole, sequenceGraph, stepGraph } from './manifest.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const modelBase = new URL(params.get('model') || 'model/', location.href);
if (!modelBase.pathname.endsWith('/')) modelBase.pathname += '/';
const ortBase = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
const POOLS = ['mean', 'last', 'state'];
const api = { status: 'starting', error: null, graph: null };
window.rwkvEmbed = api;

function setStatus(s) {
  api.status = s;
  document.body.dataset.status = s;
  $('compare').disabled = s !== 'ready';
}

function showError(e) {
  api.error = e && e.message ? e.message : String(e);
  $('error').hidden = false;
  $('error').textContent = api.error;
  setStatus('error');
}

const role = (graph, r) => graph.outputs.find((o) => o.role === r);

// The graph to embed with: its hidden output is what the page needs (a folder exported without --embedding has none).
function pickGraph(m) {
  const variant = params.get('variant') || 'fp32';
  const want = params.get('graph');
  const graph = want === 'step' ? stepGraph(m, variant) : (sequenceGraph(m, variant) ?? stepGraph(m, variant));
  if (want === 'prefill' && graph.kind !== 'sequence') throw new Error(`no prompt graph of variant '${variant}'`);
  if (!role(graph, 'hidden') || (graph.kind === 'sequence' && !role(graph, 'hidden_sum'))) {
    throw new Error(`${graph.file} has no embedding outputs: the folder was exported without --embedding; ` +
      're-export it with `rwkv-export onnx SOURCE -o DIR --embedding`');
  }
  return graph;
}

async function tokenizerFor(m) {
  const t = m.tokenizer;
  if (t.kind === 'bytes') return loadTokenizer({ kind: 'bytes', vocab_size: t.vocab_size ?? 256 });
  const url = new URL(t.file, modelBase).href;
  const res = await fetch(url, { cache: 'no-cache' });
  if (!res.ok) throw new Error(`tokenizer ${url}: HTTP ${res.status}`);
  if (t.kind === 'hf-tokenizers') return loadTokenizer({ kind: t.kind, json: await res.json() });
  if (t.kind === 'rwkv-world') {
    return loadTokenizer({ kind: t.kind, vocab: await res.text(), vocab_size: t.vocab_size });
  }
  throw new Error(`the manifest's tokenizer kind '${t.kind}' is not supported by this page`);
}

async function fetchBytes(file) {
  const res = await fetch(new URL(file, modelBase).href);
  if (!res.ok) throw new Error(`${file}: HTTP ${res.status}`);
  return new Uint8Array(await res.arrayBuffer());
}

async function createSession(ort, m, graph) {
  const [main, ...data] = graphFiles(m, graph).map((f) => f.file);
  const bytes = await fetchBytes(main);
  const dir = graph.file.includes('/') ? graph.file.slice(0, graph.file.lastIndexOf('/') + 1) : '';
  const externalData = await Promise.all(data.map(async (f) => ({
    path: f.slice(dir.length), data: await fetchBytes(f),
  })));
  return ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], ...(data.length ? { externalData } : {}) });
}

// The chunk sizes rwkv_export.seq_runner.chunk_sizes feeds: the fewest chunks of at most max, as equal as possible.
function chunkSizes(n, max) {
  const count = Math.ceil(n / max);
  const base = Math.floor(n / count);
  const extra = n % count;
  return Array.from({ length: count }, (_, i) => base + (i < extra ? 1 : 0));
}

function makeEmbedder(ort, m, graph, session) {
  const io = ioByRole(graph, m);
  const hidden = role(graph, 'hidden').name;
  const hiddenSum = graph.kind === 'sequence' ? role(graph, 'hidden_sum').name : null;
  const tokenTensor = (ids) => new ort.Tensor(io.token.dtype,
    io.token.dtype === 'int64' ? BigInt64Array.from(ids, BigInt) : Int32Array.from(ids), [ids.length]);
  const freshState = () => Object.fromEntries(m.state.tensors.map((t) => {
    const spec = io.stateIn.get(t.name);
    const n = spec.shape.reduce((a, b) => a * b, 1);
    return [t.name, new ort.Tensor('float32', new Float32Array(n).fill(t.init), spec.shape)];
  }));

  // token ids -> {last, mean, state}, as rwkv_export.embed.Embedder.embed_tokens
  async function embedIds(ids) {
    if (!ids.length) throw new Error('an empty text has no embedding (it encodes to no tokens)');
    let state = freshState();
    let last = null;
    const sum = new Float64Array(m.model.n_embd);
    const calls = graph.kind === 'sequence' ? chunkSizes(ids.length, graph.max_chunk) : ids.map(() => 1);
    let start = 0;
    for (const size of calls) {
      const feeds = { [io.token.name]: tokenTensor(ids.slice(start, start + size)) };
      for (const n of io.names) feeds[io.stateIn.get(n).name] = state[n];
      const out = await session.run(feeds);
      last = out[hidden].data;
      const add = hiddenSum ? out[hiddenSum].data : last;
      for (let i = 0; i < sum.length; i++) sum[i] += add[i];
      state = Object.fromEntries(io.names.map((n) => [n, out[io.stateOut.get(n).name]]));
      start += size;
    }
    const flat = [];
    for (const n of io.names) flat.push(...state[n].data);
    return { last: Float64Array.from(last), mean: sum.map((x) => x / ids.length), state: Float64Array.from(flat) };
  }
  return embedIds;
}

function cosine(a, b) {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) { ab += a[i] * b[i]; aa += a[i] * a[i]; bb += b[i] * b[i]; }
  if (aa === 0 || bb === 0) throw new Error('cosine similarity of a zero vector is undefined');
  return ab / Math.sqrt(aa * bb);
}

async function start() {
  const m = await fetchManifest(modelBase);
  const graph = pickGraph(m);
  api.graph = graph.kind === 'sequence' ? 'prefill' : 'step';
  const d = m.model;
  $('model-summary').textContent = `RWKV-${d.rwkv_version} · ${d.n_layer} layers × ${d.n_embd} · ` +
    `${graph.variant} ${api.graph} graph (${graph.file})`;
  const tokenizer = await tokenizerFor(m);
  const ort = await import(new URL('ort.wasm.min.mjs', ortBase).href);
  ort.env.wasm.wasmPaths = ortBase;
  ort.env.wasm.numThreads = 1;
  ort.env.logLevel = 'error';
  const embedIds = makeEmbedder(ort, m, graph, await createSession(ort, m, graph));
  let busy = Promise.resolve();
  const serial = (f) => (busy = busy.then(f, f)); // one session run at a time
  api.embed = (text, pool = 'mean') => serial(async () => {
    if (!POOLS.includes(pool)) throw new Error(`unknown pooling '${pool}'; choose from ${POOLS.join(', ')}`);
    return (await embedIds(tokenizer.encode(text)))[pool];
  });
  api.similarity = async (a, b, pool = 'mean') => cosine(await api.embed(a, pool), await api.embed(b, pool));
  $('compare').addEventListener('click', async () => {
    setStatus('running');
    try {
      const pool = $('pool').value;
      const s = await api.similarity($('text-a').value, $('text-b').value, pool);
      $('similarity').textContent = s.toFixed(6);
      $('detail').textContent = `(${pool} pooling, ${api.graph} graph)`;
      setStatus('ready');
    } catch (e) {
      showError(e);
    }
  });
  setStatus('ready');
}

start().catch(showError);
