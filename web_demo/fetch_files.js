// Fetching a model's files for every runtime of the demo and of runtimes.html (worker.js, rt_webgpu.js, rt_common.js):
// streamed downloads checked against the manifest's sizes and sha256, progress messages, errors that name their
// phase, and the event-loop yield that lets Stop be handled between tokens.

import { graphFiles } from './manifest.js';

export const PROGRESS_INTERVAL_MS = 100; // at most ~10 progress messages a second

export class PhaseError extends Error {
  constructor(phase, message) {
    super(message);
    this.phase = phase;
  }
}

export function errorText(e) {
  if (e == null) return 'unknown error';
  const msg = typeof e === 'string' ? e : (e.message || String(e));
  return msg.trim() || (e.name ?? 'error');
}

// Lets queued messages (stop) be handled between tokens: a MessageChannel task, not setTimeout (clamped to 4 ms).
export function yieldToEvents() {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => { ch.port1.close(); resolve(); };
    ch.port2.postMessage(0);
  });
}

export async function download(url, expectedSize, onBytes) {
  let res;
  try {
    res = await fetch(url, { cache: 'no-cache' });
  } catch (e) {
    throw new PhaseError('download', `cannot fetch ${url}: ${errorText(e)}`);
  }
  if (!res.ok) throw new PhaseError('download', `${url}: HTTP ${res.status} ${res.statusText}`);
  const header = Number(res.headers.get('Content-Length'));
  const total = expectedSize ?? (Number.isFinite(header) && header > 0 ? header : null);
  if (expectedSize != null && Number.isFinite(header) && header > 0 && header !== expectedSize) {
    throw new PhaseError('download', `${url} is ${header} bytes but the manifest says ${expectedSize}: damaged or replaced`);
  }
  if (!res.body) {
    const buf = new Uint8Array(await res.arrayBuffer());
    onBytes(buf.length);
    return buf;
  }
  const reader = res.body.getReader();
  let buf = total != null ? new Uint8Array(total) : new Uint8Array(1 << 20);
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (n + value.length > buf.length) {
      if (total != null) {
        await reader.cancel();
        throw new PhaseError('download', `${url} is longer than the ${total} bytes the manifest lists: damaged or replaced`);
      }
      const bigger = new Uint8Array(Math.max(buf.length * 2, n + value.length));
      bigger.set(buf.subarray(0, n));
      buf = bigger;
    }
    buf.set(value, n);
    n += value.length;
    onBytes(value.length);
  }
  if (total != null && n !== total) {
    throw new PhaseError('download', `${url} has ${n} bytes but the manifest lists ${total}: damaged or truncated`);
  }
  return total != null ? buf : buf.slice(0, n);
}

export async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

// Download every file of the graphs (each once: a variant's step and prompt graphs share one weights file), checked
// against the manifest's sizes and (with verify) sha256, with progress messages through post (at most one per
// PROGRESS_INTERVAL_MS): {files: Map file -> Uint8Array, seconds, verifySeconds, bytes}.
export async function fetchGraphFiles(manifest, modelBase, graphs, verify, post = () => {}) {
  const seen = new Set();
  const files = graphs.flatMap((g) => graphFiles(manifest, g).map((f) => ({ ...f, graph: g })))
    .filter((f) => !seen.has(f.file) && seen.add(f.file));
  const total = files.every((f) => f.size != null) ? files.reduce((a, f) => a + f.size, 0) : null;
  let loaded = 0;
  let lastPost = 0;
  const t0 = performance.now();
  const out = new Map();
  let verifyMs = 0;
  for (const f of files) {
    const url = new URL(f.file, modelBase).href;
    const report = (force) => {
      const now = performance.now();
      if (!force && now - lastPost < PROGRESS_INTERVAL_MS) return;
      lastPost = now;
      post({ type: 'progress', phase: 'download', file: f.file, loaded, total, seconds: (now - t0) / 1000 });
    };
    report(true);
    const bytes = await download(url, f.size, (k) => { loaded += k; report(false); });
    report(true);
    if (verify && f.sha256) {
      if (!globalThis.crypto?.subtle) {
        post({ type: 'notice', message: `${f.file}: sha256 not checked (crypto.subtle needs a secure context: use http://127.0.0.1 or https)` });
      } else {
        post({ type: 'progress', phase: 'verify', file: f.file });
        const tv = performance.now();
        const got = await sha256Hex(bytes);
        verifyMs += performance.now() - tv;
        if (got !== f.sha256) {
          throw new PhaseError('verify', `${f.file} does not match the manifest (sha256 ${got.slice(0, 12)}… ≠ ${f.sha256.slice(0, 12)}…): damaged or edited`);
        }
      }
    }
    out.set(f.file, bytes);
  }
  return { files: out, seconds: (performance.now() - t0 - verifyMs) / 1000, verifySeconds: verifyMs / 1000, bytes: loaded };
}
