// Tokenizers for the RWKV web demo. Pure JavaScript ES module with no imports,
// so the browser can load it as a plain file (no bundler, no import map) and
// Node 20 can load it too. It uses only web-standard globals: TextEncoder,
// TextDecoder, String.prototype.normalize, Unicode RegExp and (optionally) fetch.
//
//   import { loadTokenizer } from './tokenizer.js';
//   const tok = await loadTokenizer({ kind: 'hf-tokenizers', json: parsedTokenizerJson });
//   const tok = await loadTokenizer({ kind: 'bytes', vocab_size: 256 });
//   const tok = await loadTokenizer({ kind: 'rwkv-world', vocab: textOfRwkvVocabTxt });   // or { url }
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
// 'rwkv-world' is the RWKV World vocabulary of the RWKV-5/6/7 World models
// (rwkv_vocab_v20230424.txt, 65,536 ids): one token a line, `ID LITERAL LENGTH`,
// LITERAL a Python str literal (the token is its UTF-8) or bytes literal.
// Encoding is greedy longest match over the text's UTF-8 bytes; decoding
// concatenates the tokens' bytes. Id 0 is end-of-text and has no bytes. It
// gives the ids of rwkv_export.world_tokenizer (and of the `rwkv` pip package's
// TRIE_TOKENIZER); tests/test_world_tokenizer.py checks this.
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

// ---- RWKV World ---------------------------------------------------------------------------------------------------

// sha256 of rwkv_vocab_v20230424.txt as shipped (CRLF line ends), and of the same file with LF line ends (a
// checkout that normalizes line endings), as in rwkv_export/tokenizer.py.
export const RWKV_WORLD_VOCAB_SHA256 = '8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008';
const RWKV_WORLD_VOCAB_SHA256_LF = 'e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89';
const WORLD_VOCAB = 65536;
const WORLD_EOS_ID = 0;

function pushUtf8(out, cp) {
  if (cp < 0x80) out.push(cp);
  else if (cp < 0x800) out.push(0xc0 | (cp >> 6), 0x80 | (cp & 63));
  else if (cp < 0x10000) out.push(0xe0 | (cp >> 12), 0x80 | ((cp >> 6) & 63), 0x80 | (cp & 63));
  else out.push(0xf0 | (cp >> 18), 0x80 | ((cp >> 12) & 63), 0x80 | ((cp >> 6) & 63), 0x80 | (cp & 63));
}

const PY_SIMPLE_ESCAPES = { '\\': 92, "'": 39, '"': 34, a: 7, b: 8, f: 12, n: 10, r: 13, t: 9, v: 11 };
const isHex = (s) => /^[0-9a-fA-F]+$/.test(s);
const isOctal = (c) => c >= '0' && c <= '7';

// The bytes of a one-line Python literal: 'str' / "str" (its UTF-8) or b'bytes' / b"bytes", with Python's escapes
// (\\ \' \" \a \b \f \n \r \t \v \ooo \xhh, and in str \uXXXX \UXXXXXXXX; an unknown escape keeps its backslash,
// as in Python). Raw and triple-quoted literals and \N{...} are refused. Throws a string saying what is wrong.
function parsePyLiteral(lit) {
  let start = 0;
  const isBytes = lit[0] === 'b' || lit[0] === 'B';
  if (isBytes) start = 1;
  const q = lit[start];
  if ((q !== "'" && q !== '"') || lit.length < start + 2 || lit[lit.length - 1] !== q) {
    throw 'not a quoted Python string or bytes literal';
  }
  const body = lit.slice(start + 1, -1);
  const out = [];
  const code = (cp) => {
    if (isBytes) {
      if (cp > 255) throw 'a bytes literal value above 0xff';
      out.push(cp);
    } else {
      if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw 'not valid Unicode (a surrogate or beyond U+10FFFF)';
      pushUtf8(out, cp);
    }
  };
  for (let i = 0; i < body.length;) {
    const c = body[i];
    if (c === q) throw 'an unescaped quote inside the literal';
    if (c !== '\\') {
      const cp = body.codePointAt(i);
      if (isBytes && cp > 0x7f) throw 'a non-ASCII character in a bytes literal';
      if (cp >= 0xd800 && cp <= 0xdfff) throw 'a lone surrogate';
      code(cp);
      i += cp > 0xffff ? 2 : 1;
      continue;
    }
    const e = body[i + 1];
    if (e === undefined) throw 'a backslash at the end of the literal';
    if (e in PY_SIMPLE_ESCAPES) { code(PY_SIMPLE_ESCAPES[e]); i += 2; continue; }
    if (isOctal(e)) {
      let j = i + 1;
      while (j < body.length && j < i + 4 && isOctal(body[j])) j++;
      code(parseInt(body.slice(i + 1, j), 8));
      i = j;
      continue;
    }
    const hexLen = e === 'x' ? 2 : !isBytes && e === 'u' ? 4 : !isBytes && e === 'U' ? 8 : 0;
    if (hexLen) {
      const h = body.slice(i + 2, i + 2 + hexLen);
      if (h.length !== hexLen || !isHex(h)) throw `a truncated \\${e} escape`;
      code(parseInt(h, 16));
      i += 2 + hexLen;
      continue;
    }
    if (!isBytes && e === 'N') throw 'a \\N{...} escape (not supported)';
    code(92); // unknown escape: the backslash stays, the next character is read as itself
    i += 1;
  }
  return out;
}

const binaryString = (bytes) => {
  let s = '';
  for (let k = 0; k < bytes.length; k += 8192) s += String.fromCharCode.apply(null, bytes.subarray(k, k + 8192));
  return s;
};

// Greedy longest match. Tokens are looked up by byte string (a "binary" JS string, one char per byte); for each
// two-byte prefix the lengths of the tokens that start with it are listed longest first, so a position tries only
// the lengths that exist, and falls back to the single byte (every byte is a token).
class WorldTokenizer {
  constructor(text) {
    this.vocabSize = WORLD_VOCAB;
    this.tokens = new Array(WORLD_VOCAB).fill(null); // id -> Uint8Array (null: no bytes)
    this.ids = new Map(); // binary string -> id
    const lens = new Map(); // (b0 << 8 | b1) -> Set of lengths
    const lines = String(text).split('\n');
    if (lines.length && lines[lines.length - 1] === '') lines.pop();
    lines.forEach((raw, n) => {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      const bad = (why) =>
        new Error(`tokenizer.js: rwkv-world vocab line ${n + 1}: ${why}: ${JSON.stringify(line.slice(0, 60))}`);
      const first = line.indexOf(' '), last = line.lastIndexOf(' ');
      if (first <= 0 || last <= first + 1) throw bad("expected 'ID LITERAL LENGTH'");
      const sid = line.slice(0, first), slen = line.slice(last + 1);
      if (!/^[0-9]+$/.test(sid) || !/^[0-9]+$/.test(slen)) throw bad('the id and length must be decimal integers');
      const id = Number(sid), length = Number(slen);
      let bytes;
      try {
        bytes = Uint8Array.from(parsePyLiteral(line.slice(first + 1, last)));
      } catch (e) {
        if (typeof e === 'string') throw bad(e);
        throw e;
      }
      if (bytes.length !== length || length === 0) {
        throw bad(`the token has ${bytes.length} bytes, the line says ${length}`);
      }
      if (!(id > 0 && id < WORLD_VOCAB)) throw bad(`id ${id} is outside 1..${WORLD_VOCAB - 1} (id 0 is end-of-text)`);
      if (this.tokens[id]) throw bad(`id ${id} is listed twice`);
      const key = binaryString(bytes);
      if (this.ids.has(key)) throw bad(`the same bytes as id ${this.ids.get(key)}`);
      this.tokens[id] = bytes;
      this.ids.set(key, id);
      if (length >= 2) {
        const k = (bytes[0] << 8) | bytes[1];
        if (!lens.has(k)) lens.set(k, new Set());
        lens.get(k).add(length);
      }
    });
    this.single = new Int32Array(256);
    for (let b = 0; b < 256; b++) {
      const id = this.ids.get(String.fromCharCode(b));
      if (id === undefined) {
        const hex = b.toString(16).padStart(2, '0');
        throw new Error(`tokenizer.js: rwkv-world vocab has no token for the single byte 0x${hex}`);
      }
      this.single[b] = id;
    }
    this.lens = new Array(65536).fill(null);
    for (const [k, set] of lens) this.lens[k] = Int32Array.from([...set].sort((a, b) => b - a));
  }

  encode(text) {
    const bytes = utf8Encoder.encode(String(text));
    const s = binaryString(bytes);
    const n = bytes.length;
    const out = [];
    for (let i = 0; i < n;) {
      let step = 1, id = this.single[bytes[i]];
      const cands = i + 1 < n ? this.lens[(bytes[i] << 8) | bytes[i + 1]] : null;
      if (cands) {
        for (const len of cands) {
          if (len > n - i) continue;
          const t = this.ids.get(s.slice(i, i + len));
          if (t !== undefined) { step = len; id = t; break; }
        }
      }
      out.push(id);
      i += step;
    }
    return out;
  }

  // Ids without bytes (end-of-text 0, ids the file does not list, out of range) are dropped, as in Python.
  idBytes(id) {
    return Number.isInteger(id) && id >= 0 && id < WORLD_VOCAB ? this.tokens[id] : null;
  }

  tokenToId(token) {
    if (token === '<|endoftext|>') return WORLD_EOS_ID;
    return this.ids.get(binaryString(utf8Encoder.encode(String(token))));
  }
}

async function sha256HexOfText(text) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return null; // not a secure context (plain http on a LAN address): cannot check
  const digest = await subtle.digest('SHA-256', utf8Encoder.encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

function concatBytes(chunks, total) {
  const out = new Uint8Array(total);
  let o = 0;
  for (const c of chunks) { out.set(c, o); o += c.length; }
  return out;
}

// Public wrapper shared by all kinds.
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

async function defaultFetchText(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`tokenizer.js: fetching ${url} failed: HTTP ${res.status}`);
  return res.text();
}

// spec: { kind: 'hf-tokenizers', json: <parsed tokenizer.json> | <url string> }
//    or { kind: 'hf-tokenizers', url: <url> }   (fetched with fetchJson)
//    or { kind: 'bytes', vocab_size: 256 }
//    or { kind: 'rwkv-world', vocab: <text of rwkv_vocab_v20230424.txt> | url: <url>, vocab_size: 65536,
//         sha256: <expected hex, default RWKV_WORLD_VOCAB_SHA256; null skips the check> }
//       The vocab's sha256 is checked where crypto.subtle exists (a secure context, Node); tok.verified says if it was.
export async function loadTokenizer(spec, fetchJson = defaultFetchJson, fetchText = defaultFetchText) {
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
  if (spec.kind === 'rwkv-world') {
    if ((spec.vocab_size ?? WORLD_VOCAB) !== WORLD_VOCAB) {
      unsupported(`rwkv-world tokenizer with vocab_size ${spec.vocab_size}`);
    }
    let text = spec.vocab;
    if (text == null && typeof spec.url === 'string') text = await fetchText(spec.url);
    if (typeof text !== 'string') throw new TypeError('tokenizer.js: rwkv-world spec needs vocab (text) or url');
    const want = spec.sha256 === undefined ? [RWKV_WORLD_VOCAB_SHA256, RWKV_WORLD_VOCAB_SHA256_LF] : [spec.sha256];
    let verified = false;
    if (want[0]) {
      const got = await sha256HexOfText(text);
      if (got !== null && !want.includes(got)) {
        throw new Error(`tokenizer.js: the rwkv-world vocab is damaged (sha256 ${got.slice(0, 12)}…, ` +
          `expected ${want[0].slice(0, 12)}…)`);
      }
      verified = got !== null;
    }
    const tok = new Tokenizer('rwkv-world', new WorldTokenizer(text));
    tok.verified = verified;
    return tok;
  }
  throw new Error(`tokenizer.js: unknown tokenizer kind ${JSON.stringify(spec.kind)}`);
}
