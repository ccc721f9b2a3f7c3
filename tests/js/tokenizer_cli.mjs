// Test driver for web_demo/tokenizer.js, called by tests/test_web_tokenizer.py.
// stdin (JSON):  { "spec": { "kind": "hf-tokenizers", "json_path": "..." } | { "kind": "bytes", "vocab_size": 256 }
//                          | { "kind": "rwkv-world", "vocab_path": "...", ["sha256": null] },
//                  "texts": [string], "id_seqs": [[int]], ["tokens": [string]] }
// stdout (JSON): { "encode": [[int]] (per text),
//                  "decode": [string], "decode_skip": [string],   (per id_seq)
//                  "stream": [[string]] (chunk per id), "stream_flush": [string],
//                  "token_to_id": [int|null] (per token), "kind", "vocab_size", "verified" }
// If the tokenizer cannot be loaded: stdout { "load_error": message }, exit code 3.
import { readFileSync } from 'node:fs';
import { loadTokenizer } from '../../web_demo/tokenizer.js';

const input = JSON.parse(readFileSync(0, 'utf8'));
const spec = { ...input.spec };
if (spec.json_path) {
  spec.json = JSON.parse(readFileSync(spec.json_path, 'utf8'));
  delete spec.json_path;
}
if (spec.vocab_path) {
  spec.vocab = readFileSync(spec.vocab_path, 'utf8');
  delete spec.vocab_path;
}
let tok;
try {
  tok = await loadTokenizer(spec);
} catch (e) {
  const msg = JSON.stringify({ load_error: String(e && e.message ? e.message : e) });
  await new Promise((resolve) => process.stdout.write(msg, resolve));
  process.exit(3);
}

const out = {
  encode: [], decode: [], decode_skip: [], stream: [], stream_flush: [], token_to_id: [],
  kind: tok.kind, vocab_size: tok.vocabSize, verified: tok.verified ?? null,
};
for (const text of input.texts) out.encode.push(tok.encode(text));
for (const ids of input.id_seqs) {
  out.decode.push(tok.decode(ids));
  out.decode_skip.push(tok.decode(ids, { skipSpecialTokens: true }));
  const dec = tok.decoder();
  out.stream.push(ids.map((id) => dec.push(id)));
  out.stream_flush.push(dec.flush());
}
for (const t of input.tokens ?? []) out.token_to_id.push(tok.tokenToId(t) ?? null);
process.stdout.write(JSON.stringify(out));
