// Builds rwkv4_int8.wasm from rwkv4_int8.wat with wabt's wat2wasm (the npm package `wabt`, a devDependency):
//   node web_demo/build_wasm.mjs [--check]
// --check: build in memory and exit 1 unless the bytes equal the committed rwkv4_int8.wasm (tests/test_wasm_native.py).
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, 'package.json'));
let wabtInit;
try {
  wabtInit = require('wabt');
} catch {
  console.error('build_wasm.mjs needs the npm package wabt: run `npm ci --prefix web_demo`');
  process.exit(2);
}
const FEATURES = { simd: true, relaxed_simd: true, threads: true };
const wabt = await wabtInit();
const src = join(here, 'rwkv4_int8.wat');
const mod = wabt.parseWat('rwkv4_int8.wat', readFileSync(src, 'utf8'), FEATURES);
mod.validate(FEATURES);
const bytes = Buffer.from(mod.toBinary({ log: false, write_debug_names: false }).buffer);
mod.destroy();
const out = join(here, 'rwkv4_int8.wasm');
if (process.argv.includes('--check')) {
  const same = Buffer.compare(bytes, readFileSync(out)) === 0;
  console.log(same ? `rwkv4_int8.wasm is what rwkv4_int8.wat builds (${bytes.length} bytes)` : 'rwkv4_int8.wasm differs from what rwkv4_int8.wat builds: run `node web_demo/build_wasm.mjs`');
  process.exit(same ? 0 : 1);
}
writeFileSync(out, bytes);
console.log(`wrote ${out} (${bytes.length} bytes)`);
