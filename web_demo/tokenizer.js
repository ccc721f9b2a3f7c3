// Tokenizers for the RWKV web demo. Pure JavaScript ES module with no imports,
// so the browser can load it as a plain file (no bundler, no import map) and
// Node 20 can load it too. It uses only web-standard globals: TextEncoder,
// TextDecoder, String.prototype.normalize, Unicode RegExp and (optionally) fetch.
//
//   import { loadTokenizer } from './tokenizer.js';
//   const tok = await loadTokenizer({ kind: 'hf-tokenizers', json: parsedTokenizerJson });
//   const tok = await loadTokenizer({ kind: 'bytes', vocab_size: 256 });
//   tok.encode(text) -> number[]
//   tok.decode(ids, { skipSpecialTokens = false }) -> string
//   tok.decoder({ skipSpecialTokens = false }) -> { push(id) -> string, flush() -> string }
//
// 'hf-tokenizers' covers the Hugging Face `tokenizers` JSON format for the
// ByteLevel BPE family (GPT-2 / GPT-NeoX 20B): NFC normalizer, ByteLevel
// pre-tokenizer/decoder, BPE model and added tokens. It reproduces the ids of
// Python `tokenizers` (tests/test_web_tokenizer.py checks this); anything outside
// that family is rejected at load time instead of silently tokenizing differently.
//
// decode() keeps special tokens by default (lossless round trip of
// "<|endoftext|>"); pass { skipSpecialTokens: true } to get Python's default
// `Tokenizer.decode(ids)` (skip_special_tokens=True).

const utf8Encoder = new TextEncoder();

// TextDecoder strips a leading U+FEFF unless ignoreBOM is set; Python keeps it.
// Invalid bytes become U+FFFD, like Rust's String::from_utf8_lossy.
const newUtf8Decoder = () => new TextDecoder('utf-8', { ignoreBOM: true });

// GPT-2 byte <-> printable character table used by ByteLevel.
const BYTE_TO_CHAR = (() => {
  const table = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    table[b] = String.fromCharCode(printable ? b : 256 + extra++);
  }
  return table;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((ch, b) => [ch, b]));

// ByteLevel split pattern. The Rust library runs it with Oniguruma, whose \s is
// Unicode White_Space (includes U+0085, excludes U+FEFF), unlike JavaScript's \s.
const BYTE_LEVEL_SPLIT =
  /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+/gu;

function unsupported(what) {
  throw new Error(`tokenizer.js: unsupported tokenizer.json feature: ${what}`);
}

function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\\/]/g, '\\$&');
}

// Leftmost-longest matcher over added tokens (as the Rust Aho-Corasick trie does).
function addedTokenMatcher(tokens) {
  if (tokens.length === 0) return null;
  const sorted = [...tokens].sort((a, b) => b.content.length - a.content.length);
  return {
    re: new RegExp(sorted.map((t) => escapeRegExp(t.content)).join('|'), 'gu'),
    ids: new Map(tokens.map((t) => [t.content, t.id])),
  };
}

// Splits text into [piece, addedTokenIdOrNull] parts, dropping empty pieces.
function splitAdded(text, matcher) {
  if (!matcher || text === '') return text === '' ? [] : [[text, null]];
  const out = [];
  let last = 0;
  matcher.re.lastIndex = 0;
  for (const m of text.matchAll(matcher.re)) {
    if (m.index > last) out.push([text.slice(last, m.index), null]);
    out.push([m[0], matcher.ids.get(m[0])]);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push([text.slice(last), null]);
  return out;
}

function preTokenize(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(BYTE_LEVEL_SPLIT)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(m[0]);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function byteLevelChars(text) {
  let s = '';
  for (const b of utf8Encoder.encode(text)) s += BYTE_TO_CHAR[b];
  return s;
}

// Min-heap of candidate merges ordered by (rank, position), as in Rust's Word::merge_all.
class MergeHeap {
  constructor() { this.rank = []; this.pos = []; }
  get size() { return this.rank.length; }
  less(i, j) {
    return this.rank[i] < this.rank[j] || (this.rank[i] === this.rank[j] && this.pos[i] < this.pos[j]);
  }
  swap(i, j) {
    [this.rank[i], this.rank[j]] = [this.rank[j], this.rank[i]];
    [this.pos[i], this.pos[j]] = [this.pos[j], this.pos[i]];
  }
  push(rank, pos) {
    this.rank.push(rank); this.pos.push(pos);
    for (let i = this.size - 1; i > 0;) {
      const p = (i - 1) >> 1;
      if (!this.less(i, p)) break;
      this.swap(i, p); i = p;
    }
  }
  pop() {
    const top = [this.rank[0], this.pos[0]];
    const lastRank = this.rank.pop(), lastPos = this.pos.pop();
    if (this.size > 0) {
      this.rank[0] = lastRank; this.pos[0] = lastPos;
      for (let i = 0; ;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < this.size && this.less(l, m)) m = l;
        if (r < this.size && this.less(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m); i = m;
      }
    }
    return top;
  }
}

class ByteLevelBPETokenizer {
  constructor(json) {
    const model = json.model;
    if (!model || model.type !== 'BPE') unsupported(`model ${model && model.type}`);
    if (model.dropout) unsupported('BPE dropout');
    if (model.continuing_subword_prefix || model.end_of_word_suffix) unsupported('BPE subword prefix/suffix');
    if (model.byte_fallback) unsupported('BPE byte_fallback');
    if (model.ignore_merges) unsupported('BPE ignore_merges');
    if (model.unk_token != null) unsupported('BPE unk_token');

    const norm = json.normalizer;
    if (norm != null && norm.type !== 'NFC') unsupported(`normalizer ${norm.type}`);
    this.nfc = norm != null;
    const pre = json.pre_tokenizer;
    if (!pre || pre.type !== 'ByteLevel' || pre.add_prefix_space || pre.use_regex === false) {
      unsupported(`pre_tokenizer ${JSON.stringify(pre)}`);
    }
    const dec = json.decoder;
    if (!dec || dec.type !== 'ByteLevel') unsupported(`decoder ${JSON.stringify(dec)}`);
    const post = json.post_processor;
    if (post != null && post.type !== 'ByteLevel') unsupported(`post_processor ${post.type}`);

    // Vocabulary (added tokens take precedence for id -> token, as in Rust).
    this.vocab = new Map(Object.entries(model.vocab));
    this.idToToken = [];
    for (const [tok, id] of this.vocab) this.idToToken[id] = tok;
    const added = json.added_tokens || [];
    for (const t of added) {
      if (t.single_word || t.lstrip || t.rstrip) unsupported(`added token options on ${JSON.stringify(t.content)}`);
      this.idToToken[t.id] = t.content;
    }
    this.addedIds = new Map(added.map((t) => [t.content, t.id]));
    this.specialIds = new Set(added.filter((t) => t.special).map((t) => t.id));
    this.rawMatcher = addedTokenMatcher(added.filter((t) => !t.normalized));
    this.normMatcher = addedTokenMatcher(added.filter((t) => t.normalized));
    this.vocabSize = this.idToToken.length;

    // Merges: pair key (left id * stride + right id) -> rank; rank -> merged id.
    this.stride = this.vocabSize;
    this.mergeRank = new Map();
    this.mergeResult = new Int32Array(model.merges.length);
    model.merges.forEach((merge, rank) => {
      const [a, b] = typeof merge === 'string' ? merge.split(' ') : merge;
      const ia = this.vocab.get(a), ib = this.vocab.get(b), ir = this.vocab.get(a + b);
      if (ia === undefined || ib === undefined || ir === undefined) unsupported(`merge out of vocabulary: ${merge}`);
      const key = ia * this.stride + ib;
      this.mergeRank.set(key, rank); // a repeated pair keeps its last rank, as in Rust
      this.mergeResult[rank] = ir;
    });

    this.cache = new Map();
    this.bytesCache = new Map();
  }

  // BPE on one pre-token (already mapped to byte-level characters).
  bpe(word) {
    const cached = this.cache.get(word);
    if (cached) return cached;
    const id = [], prev = [], next = [];
    for (const ch of word) {
      const v = this.vocab.get(ch);
      if (v === undefined) continue; // no unk_token: Rust drops unknown characters
      id.push(v);
    }
    const n = id.length;
    for (let i = 0; i < n; i++) { prev.push(i - 1); next.push(i + 1 < n ? i + 1 : -1); }
    const alive = new Uint8Array(n).fill(1);
    const heap = new MergeHeap();
    const pairRank = (i, j) => this.mergeRank.get(id[i] * this.stride + id[j]);
    for (let i = 0; i + 1 < n; i++) {
      const r = pairRank(i, i + 1);
      if (r !== undefined) heap.push(r, i);
    }
    while (heap.size > 0) {
      const [rank, pos] = heap.pop();
      const right = next[pos];
      if (!alive[pos] || right < 0 || pairRank(pos, right) !== rank) continue; // stale entry
      id[pos] = this.mergeResult[rank];
      alive[right] = 0;
      next[pos] = next[right];
      if (next[pos] >= 0) prev[next[pos]] = pos;
      if (prev[pos] >= 0) {
        const r = pairRank(prev[pos], pos);
        if (r !== undefined) heap.push(r, prev[pos]);
      }
      if (next[pos] >= 0) {
        const r = pairRank(pos, next[pos]);
        if (r !== undefined) heap.push(r, pos);
      }
    }
    const out = [];
    for (let i = n > 0 ? 0 : -1; i >= 0; i = next[i]) out.push(id[i]);
    if (this.cache.size >= 20000) this.cache.clear();
    this.cache.set(word, out);
    return out;
  }

  encode(text) {
    const ids = [];
    for (const [piece, addedId] of splitAdded(String(text), this.rawMatcher)) {
      if (addedId != null) { ids.push(addedId); continue; }
      const normalized = this.nfc ? piece.normalize('NFC') : piece;
      for (const [sub, subId] of splitAdded(normalized, this.normMatcher)) {
        if (subId != null) { ids.push(subId); continue; }
        for (const word of preTokenize(sub)) {
          for (const v of this.bpe(byteLevelChars(word))) ids.push(v);
        }
      }
    }
    return ids;
  }

  // UTF-8 bytes of one token per the ByteLevel decoder: map each character back
  // to its byte, or, if any character is outside the table (e.g. added tokens
  // made of plain spaces), use the token's own UTF-8 bytes. Unknown ids -> null.
  tokenBytes(id) {
    let bytes = this.bytesCache.get(id);
    if (bytes !== undefined) return bytes;
    const tok = Number.isInteger(id) ? this.idToToken[id] : undefined;
    if (tok === undefined) {
      bytes = null;
    } else {
      const mapped = [];
      for (const ch of tok) {
        const b = CHAR_TO_BYTE.get(ch);
        if (b === undefined) { mapped.length = 0; mapped.push(...utf8Encoder.encode(tok)); break; }
        mapped.push(b);
      }
      bytes = Uint8Array.from(mapped);
    }
    this.bytesCache.set(id, bytes);
    return bytes;
  }

  idBytes(id, skipSpecialTokens) {
    if (skipSpecialTokens && this.specialIds.has(id)) return null;
    return this.tokenBytes(id); // unknown ids are dropped, as in Python
  }

  tokenToId(token) {
    const added = this.addedIds.get(token);
    return added !== undefined ? added : this.vocab.get(token);
  }
}

class BytesTokenizer {
  constructor(vocabSize) {
    if (vocabSize !== 256) unsupported(`bytes tokenizer with vocab_size ${vocabSize}`);
    this.vocabSize = vocabSize;
  }
  encode(text) {
    return Array.from(utf8Encoder.encode(String(text)));
  }
  idBytes(id) {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
      throw new RangeError(`bytes tokenizer: id ${id} out of range [0, ${this.vocabSize})`);
    }
    return Uint8Array.of(id);
  }
  tokenToId() {
    return undefined;
  }
}

function concatBytes(chunks, total) {
  const out = new Uint8Array(total);
  let o = 0;
  for (const c of chunks) { out.set(c, o); o += c.length; }
  return out;
}

// Public wrapper shared by both kinds.
class Tokenizer {
  constructor(kind, impl) {
    this.kind = kind;
    this.impl = impl;
    this.vocabSize = impl.vocabSize;
  }
  encode(text) {
    return this.impl.encode(text);
  }
  decode(ids, { skipSpecialTokens = false } = {}) {
    const chunks = [];
    let total = 0;
    for (const id of ids) {
      const b = this.impl.idBytes(Number(id), skipSpecialTokens);
      if (b) { chunks.push(b); total += b.length; }
    }
    return newUtf8Decoder().decode(concatBytes(chunks, total));
  }
  // Streaming decoder: push(id) returns the text completed by this id; bytes of
  // a UTF-8 character split across tokens are held back until it is complete.
  // flush() returns whatever is still held (U+FFFD if the sequence never completed).
  decoder({ skipSpecialTokens = false } = {}) {
    const td = newUtf8Decoder();
    return {
      push: (id) => {
        const b = this.impl.idBytes(Number(id), skipSpecialTokens);
        return b ? td.decode(b, { stream: true }) : '';
      },
      flush: () => td.decode(),
    };
  }
  // Id of a token string / added token content (e.g. "<|endoftext|>"), or undefined.
  tokenToId(token) {
    return this.impl.tokenToId(token);
  }
}

async function defaultFetchJson(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`tokenizer.js: fetching ${url} failed: HTTP ${res.status}`);
  return res.json();
}

// spec: { kind: 'hf-tokenizers', json: <parsed tokenizer.json> | <url string> }
//    or { kind: 'hf-tokenizers', url: <url> }   (fetched with fetchJson)
//    or { kind: 'bytes', vocab_size: 256 }
export async function loadTokenizer(spec, fetchJson = defaultFetchJson) {
  if (!spec || typeof spec !== 'object') throw new TypeError('tokenizer.js: spec must be an object');
  if (spec.kind === 'bytes') {
    return new Tokenizer('bytes', new BytesTokenizer(spec.vocab_size ?? 256));
  }
  if (spec.kind === 'hf-tokenizers') {
    let json = spec.json;
    if (typeof json === 'string') json = await fetchJson(json);
    else if (json == null && typeof spec.url === 'string') json = await fetchJson(spec.url);
    if (!json || typeof json !== 'object') throw new TypeError('tokenizer.js: hf-tokenizers spec needs json (object or URL)');
    return new Tokenizer('hf-tokenizers', new ByteLevelBPETokenizer(json));
  }
  throw new Error(`tokenizer.js: unknown tokenizer kind ${JSON.stringify(spec.kind)}`);
}
