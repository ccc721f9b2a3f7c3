"""The TF.js Node driver's faster paths give the very bytes of the plain ones (tiny-pydoc, every TF.js variant):

- its own weight decoder (tfjs_step.mjs decodeWeights) against TF.js's tf.io.decodeWeights, run by the same driver
  (`decoder="tfjs"`): the same logits and state bytes at every step, the same greedy tokens;
- its binary protocol (TFJSStepRunner) against the plain way of running a TF.js graph model that the driver used to
  speak: tfconv.loadGraphModel, tensors made from base64 float32 in JSON, outputs read back with dataSync and sent as
  base64 (PLAIN_JS below, written here, not the driver's code), step for step, byte for byte.

The model is re-sharded into shards of an odd size, so that weights straddle shard boundaries and lie at offsets
that no float32 (or uint16) view can take: the decoder's copying paths run too, not only its views.
Needs Node >= 20 and `npm ci --prefix rwkv_export/js` (fails with that instruction, never skips).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import numpy as np
import pytest

from rwkv_export import parity
from rwkv_export.errors import RwkvExportError
from rwkv_export.manifest import new_manifest, read_manifest, write_manifest
from rwkv_export.tf_runners import NODE_DIR, TFJSStepRunner

VARIANTS = ["fp32", "fp16", "uint8"]
ODD_SHARD_BYTES = 65537  # odd: most weights start at offsets no 4- or 2-byte view can use
STEPS = 12  # parity tokens stepped per comparison (each step's state is fed back: a difference would grow)

# The plain way, as the driver did it before its binary protocol and decoder: one JSON line per step in, one out.
PLAIN_JS = r"""
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
const [modelPath, packages, backend, reqPath] = process.argv.slice(2);
const require = createRequire(join(packages, 'package.json'));
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const tfconv = require('@tensorflow/tfjs-converter');
const wasm = require('@tensorflow/tfjs-backend-wasm');
wasm.setWasmPaths(dirname(require.resolve('@tensorflow/tfjs-backend-wasm')) + '/');
if (!(await tf.setBackend(backend))) throw new Error('no ' + backend);
await tf.ready();
const json = JSON.parse(readFileSync(modelPath, 'utf8'));
const weightSpecs = [];
const shards = [];
for (const g of json.weightsManifest) {
  weightSpecs.push(...g.weights);
  for (const p of g.paths) { const b = readFileSync(join(dirname(modelPath), p)); shards.push(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)); }
}
const model = await tfconv.loadGraphModel({ load: async () => ({
  modelTopology: json.modelTopology, weightSpecs, weightData: shards, format: json.format, signature: json.signature }) });
const sig = json.signature;
const states = Object.keys(sig.inputs).filter((k) => k !== 'token');
const shape = (spec) => (spec.tensorShape.dim || []).map((d) => Number(d.size));
const b64 = (f) => Buffer.from(f.buffer, f.byteOffset, f.byteLength).toString('base64');
const req = JSON.parse(readFileSync(reqPath, 'utf8'));
let state = Object.fromEntries(states.map((s) => {
  const u8 = Buffer.from(req.state[s], 'base64');
  const f = new Float32Array(u8.byteLength / 4);
  new Uint8Array(f.buffer).set(u8);
  return [s, f];
}));
for (const token of req.tokens) {
  const feeds = { [sig.inputs.token.name]: tf.tensor([token], shape(sig.inputs.token), 'int32') };
  for (const s of states) feeds[sig.inputs[s].name] = tf.tensor(state[s], shape(sig.inputs[s]), 'float32');
  const outs = model.execute(feeds, [sig.outputs.logits.name, ...states.map((s) => sig.outputs[`${s}_out`].name)]);
  const vals = outs.map((t) => t.dataSync());
  for (const t of [...Object.values(feeds), ...outs]) t.dispose();
  state = Object.fromEntries(states.map((s, i) => [s, vals[i + 1]]));
  process.stdout.write(JSON.stringify({ logits: b64(vals[0]), state: Object.fromEntries(states.map((s) => [s, b64(state[s])])) }) + '\n');
}
"""


def _require_node():
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@tensorflow" / "tfjs-converter").is_dir():
        pytest.fail(f"needs node >= 20 and `npm ci --prefix {NODE_DIR}`")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from rwkv_export.arch.rwkv4.step import RWKV4Step
    from rwkv_export.sources import Source
    from rwkv_export.targets.tfjs import export_tfjs

    torch.set_num_threads(1)
    ckpt = Source("builtin:tiny-pydoc").load()
    out = tmp_path_factory.mktemp("tfjs_odd_shards")
    entries = export_tfjs(RWKV4Step(ckpt), out, VARIANTS, shard_bytes=ODD_SHARD_BYTES, prefill=True)
    manifest = new_manifest(arch=ckpt.arch, dims=ckpt.dims, source={"kind": "test"}, tokenizer={"kind": "bytes"})
    manifest["graphs"] = entries
    write_manifest(out, manifest)
    m = read_manifest(out)
    for v in VARIANTS:  # the premise: several shards, weights across their boundaries
        mj = json.loads((out / _graph(m, v)["file"]).read_text())
        assert len(mj["weightsManifest"][0]["paths"]) > 3, v
    return out, m


def _graph(m, variant):
    return next(g for g in m["graphs"] if g["kind"] == "step" and g["variant"] == variant)


def _steps(runner, tokens):
    state, out = runner.new_state(), []
    for t in tokens:
        logits, state = runner.step(t, state)
        out.append((logits.tobytes(), {s: a.tobytes() for s, a in state.items()}))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_decoder_gives_tfjs_own_weights(exported, variant):
    """Same driver, two weight decoders: every step's logits and state bytes, and the greedy tokens, are equal."""
    _require_node()
    out, m = exported
    g = _graph(m, variant)
    tokens = parity.parity_tokens(int(m["model"]["vocab_size"]), STEPS)
    runs = {}
    for decoder in (None, "tfjs"):
        with TFJSStepRunner(out, m, g, decoder=decoder) as r:
            assert r.decoder == (decoder or "fast"), r.decoder
            runs[r.decoder] = (_steps(r, tokens), r.greedy(tokens[0], 8, r.new_state())[0])
    assert runs["fast"][0] == runs["tfjs"][0]
    assert runs["fast"][1] == runs["tfjs"][1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_binary_protocol_gives_the_plain_drivers_bytes(exported, variant, tmp_path):
    """TFJSStepRunner's logits and states equal, byte for byte, those of PLAIN_JS (stock loading, base64 JSON)."""
    _require_node()
    out, m = exported
    g = _graph(m, variant)
    tokens = parity.parity_tokens(int(m["model"]["vocab_size"]), STEPS)
    with TFJSStepRunner(out, m, g) as r:
        got = _steps(r, tokens)
        init = r.new_state()
        backend = r.backend
    names = {spec["name"]: spec["state"] for spec in g["inputs"] if spec.get("role") == "state"}
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"tokens": [int(t) for t in tokens], "state": {
        k: base64.b64encode(np.ascontiguousarray(init[s], np.float32).tobytes()).decode() for k, s in names.items()}}))
    script = tmp_path / "plain.mjs"
    script.write_text(PLAIN_JS)
    res = subprocess.run(["node", str(script), str((out / g["file"]).absolute()), str(NODE_DIR), backend, str(req)],
                         cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert len(lines) == len(tokens)
    want = [(base64.b64decode(x["logits"]), {names[k]: base64.b64decode(v) for k, v in x["state"].items()})
            for x in lines]
    assert got == want


def test_a_bad_request_is_one_line_and_the_driver_stays_in_step(exported):
    """State bytes of the wrong length: a one-line error; the next request is read from the right place."""
    _require_node()
    out, m = exported
    with TFJSStepRunner(out, m, _graph(m, "fp32")) as r:
        with pytest.raises(RwkvExportError, match="state bytes") as e:
            r._ask({"op": "step", "token": 1, "state": r._state_req(r.new_state())[:-4]})
        assert "\n" not in str(e.value)
        logits, state = r.step(1, r.new_state())
        assert np.isfinite(logits).all() and list(logits.shape) == r.io["logits"]["shape"]
