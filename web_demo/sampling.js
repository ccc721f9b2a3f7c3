// Sampling from logits for the web demo: the same rule as runtime_ref/sampling.py, in float64.
//
//   1. probs = softmax(logits)
//   2. min-p: p_max = max(probs); drop every token with prob < minPRatio * p_max ** minPPower (the most likely
//      token is always kept); renormalise. minPRatio = 0 disables it.
//   3. top-p: keep the smallest set of most likely tokens whose mass is >= topP; renormalise. topP = 1 disables it.
//   4. temperature: probs ** (1 / temperature), renormalise.
//   5. draw one token with a seeded PRNG (so a seed reproduces a run in the browser; the draws differ from
//      torch.multinomial's, the distribution does not).
// temperature = 0 skips all of this and returns argmax(logits) (the first maximal index, like torch.argmax).

// Index of the largest value (the first one on ties).
export function argmax(logits) {
  let best = 0;
  let bestValue = logits[0];
  for (let i = 1; i < logits.length; i++) {
    if (logits[i] > bestValue) { bestValue = logits[i]; best = i; }
  }
  return best;
}

export function checkParams({ temperature, topP, minPRatio, minPPower }) {
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new RangeError(`temperature must be >= 0, got ${temperature}`);
  if (!(topP > 0 && topP <= 1)) throw new RangeError(`top-p must lie in (0, 1], got ${topP}`);
  if (!(minPRatio >= 0) || !Number.isFinite(minPRatio)) throw new RangeError(`min-p ratio must be >= 0, got ${minPRatio}`);
  if (!(minPPower >= 0) || !Number.isFinite(minPPower)) throw new RangeError(`min-p power must be >= 0, got ${minPPower}`);
}

// The kept tokens and their renormalised probabilities (steps 1-4): { ids: Int32Array, probs: Float64Array }.
export function keptDistribution(logits, { temperature = 1, topP = 1, minPRatio = 0.02, minPPower = 2 } = {}) {
  checkParams({ temperature, topP, minPRatio, minPPower });
  if (!(temperature > 0)) throw new RangeError('temperature must be > 0 here (0 means argmax)');
  const n = logits.length;
  const best = argmax(logits);
  const m = logits[best];
  if (!Number.isFinite(m)) throw new RangeError(`logits are not finite (max ${m})`);
  // 1. softmax in float64; e[best] = 1 so p_max = 1 / sum.
  const e = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) { const v = Math.exp(logits[i] - m); e[i] = v; sum += v; }
  // 2. min-p.
  let ids;
  if (minPRatio > 0) {
    const threshold = minPRatio * Math.pow(1 / sum, minPPower);
    const kept = [];
    for (let i = 0; i < n; i++) if (e[i] / sum >= threshold || i === best) kept.push(i);
    ids = Int32Array.from(kept);
  } else {
    ids = new Int32Array(n);
    for (let i = 0; i < n; i++) ids[i] = i;
  }
  let probs = new Float64Array(ids.length);
  let keptSum = 0;
  for (let j = 0; j < ids.length; j++) { probs[j] = e[ids[j]] / sum; keptSum += probs[j]; }
  for (let j = 0; j < probs.length; j++) probs[j] /= keptSum;
  // 3. top-p, in descending order of probability.
  if (topP < 1) {
    const order = Array.from(ids.keys()).sort((a, b) => probs[b] - probs[a]);
    const keepIds = [];
    const keepProbs = [];
    let before = 0;
    for (const j of order) {
      if (!(before < topP)) break; // a token is needed while the mass before it is still short of top-p
      keepIds.push(ids[j]);
      keepProbs.push(probs[j]);
      before += probs[j];
    }
    ids = Int32Array.from(keepIds);
    probs = Float64Array.from(keepProbs);
    let s = 0;
    for (const p of probs) s += p;
    for (let j = 0; j < probs.length; j++) probs[j] /= s;
  }
  // 4. temperature (divide by the max first: no underflow to an all-zero sum).
  if (temperature !== 1) {
    let pmax = 0;
    for (const p of probs) if (p > pmax) pmax = p;
    let s = 0;
    for (let j = 0; j < probs.length; j++) { probs[j] = Math.pow(probs[j] / pmax, 1 / temperature); s += probs[j]; }
    for (let j = 0; j < probs.length; j++) probs[j] /= s;
  }
  return { ids, probs };
}

// The full distribution over the vocabulary (for tests: compare with runtime_ref.sampling_probs).
export function samplingProbs(logits, params) {
  const { ids, probs } = keptDistribution(logits, params);
  const out = new Float64Array(logits.length);
  for (let j = 0; j < ids.length; j++) out[ids[j]] = probs[j];
  return out;
}

// One token id. rng() returns a float in [0, 1).
export function sampleToken(logits, params, rng) {
  if (params.temperature === 0) return argmax(logits);
  const { ids, probs } = keptDistribution(logits, params);
  // Draw in ascending id order so a seed gives the same token whatever order top-p sorted in.
  const order = Array.from(ids.keys()).sort((a, b) => ids[a] - ids[b]);
  let u = rng();
  for (const j of order) {
    u -= probs[j];
    if (u < 0) return ids[j];
  }
  return ids[order[order.length - 1]]; // u landed on the rounding slack at the top end
}

// Seeded PRNG: splitmix32 to spread the seed, then sfc32 (small, fast, passes PractRand to large sizes).
// Returns a function giving floats in [0, 1) with 53 random bits.
export function makeRng(seed) {
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new RangeError(`seed must be an integer in [0, 2^32), got ${seed}`);
  let s = seed >>> 0;
  const splitmix = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = splitmix(), b = splitmix(), c = splitmix(), d = splitmix();
  const next32 = () => {
    const t = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = ((c << 21) | (c >>> 11)) >>> 0;
    c = (c + t) >>> 0;
    return t;
  };
  for (let i = 0; i < 12; i++) next32();
  return () => ((next32() >>> 5) * 67108864 + (next32() >>> 6)) / 9007199254740992;
}

// The decode loop the workers share (worker.js, wasm_native_worker.js): from the prompt's logits, pick a token
// (greedy at temperature 0, else sampled), post it, run the model on it, until maxTokens, the end-of-text id, or
// stop. `step(id)` -> logits (or a promise of them); `stopped()` says whether Stop was pressed; `pause()` lets queued
// messages (Stop) in between tokens; t1 the start time the token messages count from. -> {ids, reason, modelMs}
// (modelMs: the time inside step, the rest being sampling, messages and JS).
export async function decode({ logits, step, params, eosId, rng, post, stopped, pause, t1 }) {
  const ids = [];
  let reason = 'max_tokens';
  let modelMs = 0;
  for (let i = 0; i < params.maxTokens; i++) {
    await pause();
    if (stopped()) { reason = 'stopped'; break; }
    const id = params.temperature === 0 ? argmax(logits) : sampleToken(logits, params, rng);
    if (eosId != null && id === eosId) { reason = 'eos'; break; }
    ids.push(id);
    post({ type: 'token', id, n: ids.length, ms: performance.now() - t1 });
    const tRun = performance.now();
    logits = await step(id);
    modelMs += performance.now() - tRun;
  }
  if (stopped() && reason === 'max_tokens' && ids.length < params.maxTokens) reason = 'stopped';
  return { ids, reason, modelMs };
}
