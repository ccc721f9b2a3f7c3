// Test driver for web_demo/tokenizer.js, called by tests/test_web_tokenizer.py.
// stdin (JSON):  { "spec": { "kind": "hf-tokenizers", "json_path": "..." } | { "kind": "bytes", "vocab_size": 256 },
//                  "texts": [string], "id_seqs": [[int]] }
// stdout (JSON): { "encode": [[int]] (per text),
//                  "decode": [string], "decode_skip": [string],   (per id_seq)
//                  "stream": [[string]] (chunk per id), "stream_flush": [string] }
import { readFileSync } from 'node:fs';
import { loadTokenizer } from '../../web_demo/tokenizer.js';

const input = JSON.parse(readFileSync(0, 'utf8'));
const spec = { ...input.spec };
if (spec.json_path) {
  spec.json = JSON.parse(readFileSync(spec.json_path, 'utf8'));
  delete spec.json_path;
}
const tok = await loadTokenizer(spec);

const out = { encode: [], decode: [], decode_skip: [], stream: [], stream_flush: [] };
for (const text of input.texts) out.encode.push(tok.encode(text));
for (const ids of input.id_seqs) {
  out.decode.push(tok.decode(ids));
  out.decode_skip.push(tok.decode(ids, { skipSpecialTokens: true }));
  const dec = tok.decoder();
  out.stream.push(ids.map((id) => dec.push(id)));
  out.stream_flush.push(dec.flush());
}
process.stdout.write(JSON.stringify(out));
