"""`rwkv-export bundle`: one folder with everything a phone app needs — the model in the app runtime's format, the
tokenizer, the manifest, and a generated INTEGRATION.md — optionally split in parts for download/app-store limits.

Runtimes:
- `ort-mobile`: ONNX Runtime's `.ort` format (onnxruntime.tools.convert_onnx_models_to_ort) plus the operator config
  for a reduced ONNX Runtime build (`--include_ops_by_config required_operators.config`);
- `tflite`: the step `.tflite` (`step` signature) and the prompt-graph `.tflite` (`prefill` signature) (needs the
  [tflite] extra).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import RwkvExportError
from .manifest import MANIFEST_NAME, write_manifest
from .outdir import check_output_dir, staged_output_dir
from .progress import QUIET, Progress

RUNTIMES = ("ort-mobile", "tflite")
OPS_CONFIG = "required_operators.config"
INTEGRATION = "INTEGRATION.md"


def _convert_to_ort(onnx_files: list[Path], out_dir: Path, progress: Progress, data_files: list[Path] = ()) -> None:
    """Convert ONNX files to ORT format (Fixed optimization style, ARM target: the phone is the target). data_files:
    their external data, which the .ort files then hold inside."""
    work = Path(tempfile.mkdtemp(prefix=".ortconv-", dir=out_dir))
    try:
        for f in dict.fromkeys([*onnx_files, *data_files]):
            shutil.copyfile(f, work / f.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
               "--output_dir", str(work / "ort"), "--optimization_style", "Fixed", "--target_platform", "arm"]
        with progress.stage(f"converting {len(onnx_files)} model(s) to ORT format"):
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RwkvExportError(f"ORT format conversion failed: {res.stderr.strip().splitlines()[-1]}")
        for f in onnx_files:
            shutil.move(work / "ort" / (f.stem + ".ort"), out_dir / (f.stem + ".ort"))
        configs = sorted((work / "ort").glob("*.config"))
        if not configs:
            raise RwkvExportError("ORT format conversion wrote no operator config")
        # drop the converter's comment lines (they hold temporary absolute paths) so the bundle is reproducible
        lines = [ln for ln in configs[0].read_text().splitlines() if not ln.startswith("#")]
        header = "# Operators and types for a reduced ONNX Runtime build: --include_ops_by_config " + OPS_CONFIG
        (out_dir / OPS_CONFIG).write_text("\n".join([header, *lines]) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def split_into_parts(root: Path, manifest: dict, part_bytes: int) -> None:
    """Split every graph file larger than part_bytes into NAME.partNNN files; record them in the graph entries (all
    entries of a file, e.g. a .tflite's step and prefill signatures, get the same parts)."""
    done = {}
    for g in manifest["graphs"]:
        if g["file"] in done:
            g.update(done[g["file"]])
            continue
        path = root / g["file"]
        if path.stat().st_size <= part_bytes:
            continue
        parts = []
        with open(path, "rb") as f:
            i = 0
            while chunk := f.read(part_bytes):
                name = f"{g['file']}.part{i:03d}"
                (root / name).write_bytes(chunk)
                parts.append({"file": name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
                i += 1
        done[g["file"]] = {"parts": parts, "size": path.stat().st_size,
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        g.update(done[g["file"]])
        path.unlink()


def make_bundle(source: str, out: str | Path, *, runtime: str = "ort-mobile", quant: list[str] = (),
                part_bytes: int | None = None, force: bool = False, tokenizer: str | None = None,
                check: bool = True, progress: Progress = QUIET, embedding: bool = False):
    """`embedding`: the graphs also output `hidden` (and the prompt graph `hidden_sum`), as `rwkv-export onnx
    --embedding` (rwkv_export/embed.py)."""
    from .export import QuantOptions, export_onnx

    if runtime not in RUNTIMES:
        raise RwkvExportError(f"unknown --runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if part_bytes is not None and part_bytes <= 0:
        raise RwkvExportError("--part-mb must be positive")
    out = Path(out)
    check_output_dir(out, force, inputs=(source, tokenizer))
    with staged_output_dir(out, force, inputs=(source, tokenizer)) as tmp:
        if runtime == "ort-mobile":
            onnx_dir = Path(tempfile.mkdtemp(prefix=".onnx-", dir=tmp))
            res = export_onnx(source, onnx_dir / "onnx", quant=quant, quant_options=QuantOptions(),
                              tokenizer=tokenizer, check=check, progress=progress, embedding=embedding)
            manifest = res.manifest
            src_dir = onnx_dir / "onnx"
            _convert_to_ort([src_dir / g["file"] for g in manifest["graphs"]], tmp, progress,
                            [src_dir / f for g in manifest["graphs"] for f in g["data_files"]])
            for g in manifest["graphs"]:
                g["onnx_parity"] = g.pop("parity")
                if "embedding" in g:  # the ONNX file's embedding report; the .ort's own comes from the check below
                    g["onnx_embedding"] = g.pop("embedding")
                g["format"], g["file"], g["data_files"] = "ort", Path(g["file"]).stem + ".ort", []
            if manifest["tokenizer"].get("file"):
                shutil.copyfile(src_dir / manifest["tokenizer"]["file"], tmp / manifest["tokenizer"]["file"])
            shutil.rmtree(onnx_dir)
            if check:
                from .check import check_graphs
                from .sources import source_from_manifest

                ckpt = source_from_manifest(manifest["model"]["source"]).load(progress)
                check_graphs(tmp, manifest, ckpt, progress=progress, raise_on_fail=True)
        else:
            from .export import _check_target_installed, build_target, load_source

            _check_target_installed("tflite")
            src, ckpt, tok = load_source(source, tokenizer, progress)
            manifest, _ = build_target("tflite", tmp, src, ckpt, tok, quant=quant, check=check, progress=progress,
                                       embedding=embedding)
        manifest["bundle"] = {"runtime": runtime, "ops_config": OPS_CONFIG if runtime == "ort-mobile" else None,
                              "integration": INTEGRATION}
        (tmp / INTEGRATION).write_text(integration_doc(manifest))
        if part_bytes:
            split_into_parts(tmp, manifest, part_bytes)
            manifest["bundle"]["part_bytes"] = part_bytes
        write_manifest(tmp, manifest)
    return manifest


# ---- INTEGRATION.md ---------------------------------------------------------------------------------------------


_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _fmt(x) -> str:
    return repr(x) if not isinstance(x, float) else (f"{x:.1f}" if x == int(x) else repr(x))


def integration_doc(m: dict) -> str:
    """Generate INTEGRATION.md from the manifest alone (the same facts an app reads at run time)."""
    md, st, gen, tok = m["model"], m["state"]["tensors"], m["generation"], m["tokenizer"]
    # how many state tensors, from the manifest (RWKV-4: five [L, C]; RWKV-5/6/7: three, one of them [L, H, N, N])
    n_state = _NUMBERS.get(len(st), str(len(st)))
    runtime = m.get("bundle", {}).get("runtime") or ("tflite" if m["graphs"][0]["format"] == "tflite" else "ort-mobile")
    g = next(x for x in m["graphs"] if x["kind"] == "step")
    seqs = [x for x in m["graphs"] if x["kind"] == "sequence"]
    tok_in = next(i for i in g["inputs"] if i["role"] == "token")
    logits = next(o for o in g["outputs"] if o["role"] == "logits")
    state_io = [(t, next(i for i in g["inputs"] if i.get("state") == t["name"]),
                 next(o for o in g["outputs"] if o.get("state") == t["name"])) for t in st]
    rows = "\n".join(f"| `{t['name']}` | `{i['name']}` | `{o['name']}` | {t['shape']} | {t['dtype']} | {_fmt(t['init'])} | {t['doc']} |"
                     for t, i, o in state_io)
    variants = "\n".join(f"| {x['variant']} | {x['kind']} | `{x['file']}` | "
                         f"{', '.join(p['file'] for p in x.get('parts', [])) or '-'} |" for x in m["graphs"])
    hidden = [o for o in g["outputs"] if o["role"] == "hidden"]  # an export made with --embedding
    hidden_note = (f"- embedding output `{hidden[0]['name']}`: shape {hidden[0]['shape']}, {hidden[0]['dtype']}: the "
                   "final hidden state of the last token (sentence embeddings, classification features; the prompt "
                   "graph adds `hidden_sum`; see the manifest spec's \"Embedding outputs\")\n") if hidden else ""
    prompt_note = ""
    if seqs:
        q = seqs[0]
        q_tok = next(i for i in q["inputs"] if i["role"] == "tokens")
        if q.get("fixed_chunk"):
            where = (f"the `{q['signature']}` signature of `{q['file']}`" if q.get("signature")
                     else f"`{q['file']}`")
            prompt_note = f"""
## Prompts in one call

{where[0].upper() + where[1:]} is the same model in GPT mode: input `{q_tok['name']}` of shape
[{q['max_chunk']}] ({q_tok['dtype']}, exactly {q['max_chunk']} tokens: the format needs static shapes) plus the same
{n_state} state inputs; outputs the logits of the last token and the state after the {q['max_chunk']} tokens — what
{q['max_chunk']} runs of the step graph give (within fp32 rounding), in one call that reads the weights once. In step
2 of the loop, feed the prompt through it {q['max_chunk']} tokens at a time, passing the state from call to call, and
the remaining tokens (fewer than {q['max_chunk']}) through the step graph; then decode with the step graph.
"""
        else:
            prompt_note = f"""
## Prompts in one call

Each `sequence` graph (e.g. `{q['file']}`) is the same model in GPT mode: input `{q_tok['name']}` of shape [T]
({q_tok['dtype']}, 1 ≤ T ≤ {q['max_chunk']}) plus the same {n_state} state inputs; outputs the logits of the last token
and the state after all T tokens — what T runs of the step graph give (within fp32 rounding), in one call that reads
the weights once. In step 2 of the loop, feed the prompt through it in chunks of at most {q['max_chunk']} tokens (its
`max_chunk`), passing the state from chunk to chunk; then decode with the step graph of the same variant.
"""
    if tok["kind"] == "bytes":
        tok_text = "byte-level: token id = byte value (0–255); decode by concatenating the bytes as UTF-8."
    elif tok["kind"] == "rwkv-world":
        tok_text = (f"`{tok['file']}`, the RWKV World vocabulary ({tok.get('vocab_size', 65536)} ids): one token a line, "
                    "`ID LITERAL LENGTH`, LITERAL a Python `str` (its UTF-8 bytes) or `bytes` literal of LENGTH bytes. "
                    "Encode by greedy longest match over the text's UTF-8 bytes (a byte trie); decode by concatenating "
                    "the tokens' bytes as UTF-8 (id 0 has none).")
    else:
        tok_text = (f"`{tok['file']}`, a Hugging Face `tokenizers` JSON (GPT-NeoX 20B BPE for Pile models). Use a "
                    "tokenizers binding for your platform, or any ByteLevel-BPE implementation that reads this file.")
    eos = " Token 0 is `<|endoftext|>`." if tok["kind"] != "bytes" else ""
    parts_note = ""
    if any("parts" in x for x in m["graphs"]):
        parts_note = ("\nSome model files are split into parts (see the table). Concatenate the parts in order, check each "
                      "part's sha256 (in `manifest.json`), and the whole file's `sha256`, before loading.\n")
    sig = g.get("signature", "step")
    heads = (f" ({md['n_head']} head{'s' if md['n_head'] != 1 else ''} of {md['head_size']})" if md.get("n_head")
             else "")
    kotlin, swift = _sketches(runtime, g, tok_in, logits, state_io, sig)
    return f"""# Integrating this bundle ({runtime})

Model: RWKV-{md['rwkv_version']}, {md['n_layer']} layers × {md['n_embd']}{heads}, ffn {md['ffn_dim']}, vocab {md['vocab_size']}.
Everything below is also in `manifest.json`; an app should read it from there rather than copy these values.

## Files

| variant | kind | model file | parts |
|---|---|---|---|
{variants}
{parts_note}
{"A reduced ONNX Runtime build for exactly these models: build ONNX Runtime with `--minimal_build --include_ops_by_config " + OPS_CONFIG + "`." if runtime == "ort-mobile" else "Signature: `" + sig + "` (run it by name; never rely on tensor order)."}

Tokenizer: {tok_text}{eos}

## Inputs and outputs

- token input `{tok_in['name']}`: shape {tok_in['shape']}, {tok_in['dtype']}
- logits output `{logits['name']}`: shape {logits['shape']}, {logits['dtype']}
{hidden_note}- state: {n_state} tensors in, the same {n_state} out, each of the shape in the table, whatever its rank (feed each
  output back as the matching input next step; a buffer of the product of its dimensions, row-major):

| state | input | output | shape | dtype | initial value | meaning |
|---|---|---|---|---|---|---|
{rows}

## The loop

1. state = for each state tensor, a buffer of its shape filled with its initial value.
2. For each prompt token t: run with token = [t] and the state; keep the outputs as the new state.
3. Take the last logits; sample the next token; run it like a prompt token; append; repeat until you have enough
   tokens{" or sample token 0" if tok["kind"] != "bytes" else ""}.
4. To keep a conversation, keep the state: it is all the model remembers (RWKV has no KV cache).
{prompt_note}
Sampling defaults: temperature {gen['temperature']}, top-p {gen['top_p']}, and the min-p rule: drop every token whose
probability is below {gen['min_p_ratio']} · p_max^{gen['min_p_power']}, then renormalise. Temperature 0 means argmax.

## Kotlin (Android) sketch

```kotlin
{kotlin}
```

## Swift (iOS) sketch

```swift
{swift}
```
"""


def _sketches(runtime, g, tok_in, logits, state_io, sig):
    import math

    # (input, output, shape, init, element count) per state tensor: every shape comes from the manifest, any rank
    names = [(i["name"], o["name"], t["shape"], t["init"], math.prod(t["shape"])) for t, i, o in state_io]
    if runtime == "ort-mobile":
        init = "\n".join(f'    "{i}" to FloatArray({n}) {{ {_fmt(float(v))}f }},' for i, _, _, v, n in names)
        feed = "\n".join(f'        "{i}" to OnnxTensor.createTensor(env, FloatBuffer.wrap(state.getValue("{i}")), '
                         f'longArrayOf({", ".join(map(str, s))})),' for i, _, s, _, _ in names)
        back = "\n".join(f'    state["{i}"] = (out.get("{o}").get() as OnnxTensor).floatBuffer.array()' for i, o, *_ in names)
        kotlin = f"""import ai.onnxruntime.*
import java.nio.FloatBuffer
import java.nio.LongBuffer

val env = OrtEnvironment.getEnvironment()
val session = env.createSession(modelBytes, OrtSession.SessionOptions())   // {g['file']}
val state = mutableMapOf(
{init}
)
fun step(token: Long): FloatArray {{
    val inputs = mapOf(
        "{tok_in['name']}" to OnnxTensor.createTensor(env, LongBuffer.wrap(longArrayOf(token)), longArrayOf(1)),
{feed}
    )
    val out = session.run(inputs)
{back}
    return (out.get("{logits['name']}").get() as OnnxTensor).floatBuffer.array()
}}"""
        sw_init = "\n".join(f'    "{i}": [Float](repeating: {_fmt(float(v))}, count: {n}),' for i, _, _, v, n in names)
        sw_feed = "\n".join(f'    inputs["{i}"] = try ORTValue(tensorData: NSMutableData(data: Data(bytes: state["{i}"]!, '
                            f'count: {n} * 4)), elementType: .float, shape: [{", ".join(map(str, s))}])'
                            for i, _, s, _, n in names)
        sw_back = "\n".join(f'    state["{i}"] = try floats(out["{o}"]!)' for i, o, *_ in names)
        swift = f"""import onnxruntime_objc

let env = try ORTEnv(loggingLevel: .warning)
let session = try ORTSession(env: env, modelPath: modelPath, sessionOptions: nil)   // {g['file']}
var state: [String: [Float]] = [
{sw_init}
]
func floats(_ v: ORTValue) throws -> [Float] {{
    let d = try v.tensorData() as Data
    return d.withUnsafeBytes {{ Array($0.bindMemory(to: Float.self)) }}
}}
func step(_ token: Int64) throws -> [Float] {{
    var inputs: [String: ORTValue] = [:]
    inputs["{tok_in['name']}"] = try ORTValue(tensorData: NSMutableData(data: withUnsafeBytes(of: token) {{ Data($0) }}), elementType: .int64, shape: [1])
{sw_feed}
    let out = try session.run(withInputs: inputs, outputNames: Set([{', '.join(f'"{o}"' for _, o, *_ in names)}, "{logits['name']}"]), runOptions: nil)
{sw_back}
    return try floats(out["{logits['name']}"]!)
}}"""
        return kotlin, swift
    tok_type = "IntArray" if tok_in["dtype"] == "int32" else "LongArray"
    # states as direct native-order buffers of n floats (any rank: the interpreter reads the bytes in row-major order)
    init = "\n".join(f'    "{i}" to floats({n}, {_fmt(float(v))}f),   // shape {s}' for i, _, s, v, n in names)
    outs = "\n".join(f'    val {o}_buf = floats({n}, 0f)' for _, o, _, _, n in names)
    kotlin = f"""import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder

fun floats(n: Int, value: Float): ByteBuffer {{
    val b = ByteBuffer.allocateDirect(n * 4).order(ByteOrder.nativeOrder())
    repeat(n) {{ b.putFloat(value) }}
    return b.rewind() as ByteBuffer
}}

val interpreter = Interpreter(modelBuffer)   // {g['file']}
var state = mutableMapOf<String, Any>(
{init}
)
fun step(token: Int): FloatArray {{
    val inputs = HashMap<String, Any>(state)
    inputs["{tok_in['name']}"] = {tok_type.replace("Array", "")}Array(1) {{ token{".toLong()" if tok_type == "LongArray" else ""} }}
    val logits = Array(1) {{ FloatArray({logits['shape'][-1]}) }}
{outs}
    val outputs = mutableMapOf<String, Any>("{logits['name']}" to logits{''.join(f', "{o}" to {o}_buf' for _, o, *_ in names)})
    interpreter.runSignature(inputs, outputs, "{sig}")
{chr(10).join(f'    state["{i}"] = {o}_buf.rewind()' for i, o, *_ in names)}
    return logits[0]
}}"""
    swift = f"""import TensorFlowLite

let interpreter = try Interpreter(modelPath: modelPath)   // {g['file']}
let runner = try interpreter.signatureRunner(with: "{sig}")
var state: [String: Data] = [:]   // each state tensor: its manifest shape in float32, filled with its initial value
func step(_ token: Int32) throws -> [Float] {{
    var inputs = state
    inputs["{tok_in['name']}"] = withUnsafeBytes(of: token) {{ Data($0) }}
    try runner.invoke(with: inputs)
{chr(10).join(f'    state["{i}"] = try runner.output(named: "{o}").data' for i, o, *_ in names)}
    let logits = try runner.output(named: "{logits['name']}").data
    return logits.withUnsafeBytes {{ Array($0.bindMemory(to: Float.self)) }}
}}"""
    return kotlin, swift
