// Reading an rwkv-export manifest.json (the format of rwkv_export/manifest.py). The demo learns everything about a
// model from it: graphs and their variants, I/O names by role, shapes, dtypes, initial state values, tokenizer.
// Nothing about the graph is hard-coded here or in the worker.

export const MANIFEST_FORMAT = 'rwkv-export-manifest';
export const MANIFEST_FORMAT_VERSION = 1;
export const TOKEN_DTYPES = ['int64', 'int32'];
export const FLOAT_DTYPES = ['float32', 'float16'];

export class ManifestError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ManifestError';
  }
}

function fail(msg) {
  throw new ManifestError(msg);
}

// Fetch and parse BASE/manifest.json; every failure becomes one readable ManifestError.
// opts.format: the step graph format the page runs ('onnx', the demo; runtimes.html passes 'tfjs' or 'tflite' too).
export async function fetchManifest(baseUrl, opts = {}) {
  const url = new URL('manifest.json', baseUrl).href;
  let res;
  try {
    res = await fetch(url, { cache: 'no-cache' });
  } catch (e) {
    fail(`cannot fetch ${url}: ${e.message}`);
  }
  if (!res.ok) {
    fail(`no manifest.json at ${url} (HTTP ${res.status}). Serve an export folder with ` +
      '`rwkv-export serve FOLDER`, or point ?model= at one.');
  }
  const text = await res.text();
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (e) {
    fail(`${url} is not valid JSON (${e.message}): damaged or not an rwkv-export manifest`);
  }
  validateManifest(manifest, url, opts);
  return manifest;
}

export function validateManifest(m, where = 'manifest.json', { format = 'onnx' } = {}) {
  if (!m || typeof m !== 'object' || m.format !== MANIFEST_FORMAT) fail(`${where} is not an rwkv-export manifest`);
  if (m.format_version !== MANIFEST_FORMAT_VERSION) {
    fail(`${where} has manifest format version ${m.format_version}; this demo reads ${MANIFEST_FORMAT_VERSION}`);
  }
  for (const key of ['model', 'state', 'tokenizer', 'graphs']) if (!m[key]) fail(`${where} has no "${key}" section`);
  if (!Array.isArray(m.state.tensors) || m.state.tensors.length === 0) fail(`${where}: state.tensors is empty`);
  const steps = stepGraphs(m, format);
  if (steps.length === 0) {
    fail(`${where} lists no ${FORMAT_TITLES[format] ?? format} step graph (graphs: ${m.graphs.map((g) => `${g.kind}/${g.format}`).join(', ') || 'none'})`);
  }
  for (const g of steps) ioByRole(g, m);
  for (const g of sequenceGraphs(m, format)) ioByRole(g, m);
  for (const g of m.graphs) for (const f of [g.file, ...(g.data_files || [])]) checkFileName(f, where);
  for (const f of m.files || []) checkFileName(f.file, where);
  if (m.tokenizer.file != null) checkFileName(m.tokenizer.file, where);
  return m;
}

// Every file a manifest names must resolve inside its folder (as rwkv_export/manifest.py requires): a relative path
// without '..' segments, scheme, query or backslash. The page fetches these names relative to the folder's URL.
export function checkFileName(name, where = 'manifest.json') {
  const bad = (why) => fail(`${where} names the file ${JSON.stringify(name)}, which ${why}: every file must lie inside the model folder`);
  if (typeof name !== 'string' || name === '') bad('is not a file name');
  if (name.startsWith('/')) bad('is an absolute path');
  if (/^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(name)) bad('has a scheme or drive letter');
  if (/[\\?#]/.test(name)) bad('contains a backslash, ? or #');
  if (name.split('/').some((seg) => seg === '..' || seg === '.' || seg === '')) bad("has an empty, '.' or '..' segment");
  return name;
}

export const FORMAT_TITLES = { onnx: 'ONNX', tfjs: 'TF.js', tflite: 'TFLite' };

export function stepGraphs(m, format = 'onnx') {
  return m.graphs.filter((g) => g.kind === 'step' && g.format === format);
}

export function sequenceGraphs(m, format = 'onnx') {
  return m.graphs.filter((g) => g.kind === 'sequence' && g.format === format);
}

export function variants(m, format = 'onnx') {
  return stepGraphs(m, format).map((g) => g.variant);
}

// Whether a variant's step graph suits a backend, from its manifest entry's "backends" (rwkv_export/quantize.py
// web_backends): true, false, or null when the manifest does not say (older exports). "webgpu-f16" is WebGPU on an
// adapter with shader-f16.
export function suits(graph, backend, { shaderF16 = false } = {}) {
  if (!Array.isArray(graph.backends)) return null;
  return graph.backends.includes(backend) || (backend === 'webgpu' && shaderF16 && graph.backends.includes('webgpu-f16'));
}

// The variant the page offers first for a backend: the smallest step graph that suits it (without "backends"
// entries: the first one listed). {variant, why}.
export function pickVariant(m, backend, features = {}) {
  const graphs = stepGraphs(m);
  const fit = graphs.filter((g) => suits(g, backend, features) === true);
  if (!fit.length) return { variant: graphs[0].variant, why: null };
  const best = fit.reduce((a, g) => (graphBytes(m, g) < graphBytes(m, a) ? g : a));
  return { variant: best.variant, why: `the smallest variant here that suits ${backend}` };
}

export function stepGraph(m, variant, format = 'onnx') {
  const g = stepGraphs(m, format).find((x) => x.variant === variant);
  if (!g) fail(`no ${FORMAT_TITLES[format] ?? format} step graph of variant '${variant}' (variants: ${variants(m, format).join(', ')})`);
  return g;
}

// The prompt graph for a variant, if the folder has one (kind "sequence", input role "tokens").
export function sequenceGraph(m, variant, format = 'onnx') {
  return sequenceGraphs(m, format).find((x) => x.variant === variant) ?? null;
}

// Files a graph needs: the .onnx and its external data files, with sizes/sha256 from manifest.files when listed.
export function graphFiles(m, graph) {
  const listed = new Map((m.files || []).map((f) => [f.file, f]));
  return [graph.file, ...(graph.data_files || [])].map((file) => ({
    file,
    size: listed.get(file)?.size ?? null,
    sha256: listed.get(file)?.sha256 ?? null,
  }));
}

export function graphBytes(m, graph) {
  return graphFiles(m, graph).reduce((n, f) => n + (f.size ?? 0), 0);
}

// Split a graph's I/O by role (as rwkv_export/runners.py io_by_role does) and check it against the state section.
export function ioByRole(graph, m) {
  const where = `graph ${graph.file}`;
  const tokenRole = graph.kind === 'sequence' ? 'tokens' : 'token';
  const token = graph.inputs.filter((i) => i.role === tokenRole);
  const logits = graph.outputs.filter((o) => o.role === 'logits');
  if (token.length !== 1 || logits.length !== 1) fail(`${where}: expected one ${tokenRole} input and one logits output`);
  if (!TOKEN_DTYPES.includes(token[0].dtype)) fail(`${where}: token input dtype ${token[0].dtype} is not supported`);
  if (!FLOAT_DTYPES.includes(logits[0].dtype)) fail(`${where}: logits dtype ${logits[0].dtype} is not supported`);
  const stateIn = new Map(graph.inputs.filter((i) => i.role === 'state').map((i) => [i.state, i]));
  const stateOut = new Map(graph.outputs.filter((o) => o.role === 'state').map((o) => [o.state, o]));
  const names = m.state.tensors.map((t) => t.name);
  for (const n of names) {
    if (!stateIn.has(n) || !stateOut.has(n)) fail(`${where}: state '${n}' has no input/output pair`);
  }
  if (stateIn.size !== names.length || stateOut.size !== names.length) fail(`${where}: state inputs/outputs differ from the manifest's state`);
  for (const [n, spec] of stateIn) {
    if (!FLOAT_DTYPES.includes(spec.dtype)) fail(`${where}: state ${n} dtype ${spec.dtype} is not supported`);
    if (!spec.shape.every((d) => Number.isInteger(d) && d > 0)) fail(`${where}: state ${n} has a non-fixed shape ${JSON.stringify(spec.shape)}`);
  }
  const other = graph.inputs.filter((i) => i.role !== tokenRole && i.role !== 'state');
  if (other.length) fail(`${where}: input ${other[0].name} has role '${other[0].role}', which this demo does not know`);
  return { token: token[0], logits: logits[0], stateIn, stateOut, names };
}

// fp32 -> IEEE half bits (round to nearest even); used for float16 state inputs.
export function float32ToFloat16Bits(value) {
  const f32 = new Float32Array([value]);
  const x = new Uint32Array(f32.buffer)[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow -> 0
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = sign | (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++;
  return half;
}

export function float16BitsToFloat32(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export function formatBytes(n) {
  if (n == null) return '? MB';
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}
