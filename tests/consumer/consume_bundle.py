"""A stand-alone app-like consumer of an rwkv-export bundle: it knows only the bundle.

It imports nothing from rwkv_export or runtime_ref — only the runtime (onnxruntime or the LiteRT interpreter), numpy,
and `tokenizers` for hf-tokenizers bundles — reads manifest.json, joins split parts (checking sha256), builds the
fresh state from the manifest (every tensor its own shape, any rank: RWKV-7's att_kv is [L, H, N, N]), feeds the
prompt and prints the prompt ids and the greedy continuation as JSON on stdout.

Tokenizers, by the manifest's tokenizer.kind: "bytes" (id = byte), "hf-tokenizers" (the `tokenizers` package on the
bundle's tokenizer.json) and "rwkv-world": a small World tokenizer written here (WorldVocab below: the bundle's vocab
.txt, its sha256 checked against the manifest, parsed with ast.literal_eval; greedy longest match over the UTF-8
bytes), since the `tokenizers` package cannot read that format and this consumer may not import rwkv_export.

    python -I consume_bundle.py BUNDLE_DIR PROMPT N_TOKENS [VARIANT]
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

# a manifest file name: relative, "/"-separated parts of these characters (no "..", no hidden names, no scheme)
SAFE_PART = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")


def bundle_file(root: Path, name: str) -> Path:
    """The file a manifest names, refused unless it resolves inside the bundle (docs/manifest.md, "Paths")."""
    parts = name.split("/")
    assert all(p and p[0] != "." and set(p) <= SAFE_PART for p in parts), f"unsafe file name in manifest: {name!r}"
    path = (root / name).resolve()
    assert path.is_relative_to(root.resolve()) and path.is_file(), f"{name!r} is not a file inside the bundle"
    return path


def read_model_bytes(root: Path, graph: dict) -> bytes:
    if "parts" not in graph:
        data = bundle_file(root, graph["file"]).read_bytes()
        entry = next(f for f in MANIFEST["files"] if f["file"] == graph["file"])
    else:
        chunks = []
        for p in graph["parts"]:
            b = bundle_file(root, p["file"]).read_bytes()
            assert hashlib.sha256(b).hexdigest() == p["sha256"], f"part {p['file']} is damaged"
            chunks.append(b)
        data, entry = b"".join(chunks), graph
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{graph['file']} is damaged"
    return data


class WorldVocab:
    """The RWKV World vocabulary as the bundle documents it (INTEGRATION.md): one token a line, `ID LITERAL LENGTH`,
    LITERAL a Python str (its UTF-8 bytes) or bytes literal of LENGTH bytes; encode = at each position the longest
    token that the rest of the text's UTF-8 bytes starts with (every single byte is a token)."""

    def __init__(self, data: bytes):
        import ast

        self.ids = {}  # token bytes -> id
        for line in data.decode("utf-8").split("\n"):  # not splitlines(): it also splits at \x0b, \x85, ...
            line = line.removesuffix("\r")  # the file as shipped has CRLF line ends
            if not line:
                continue
            tid, rest = line.split(" ", 1)
            literal, length = rest.rsplit(" ", 1)
            value = ast.literal_eval(literal)
            token = value.encode("utf-8") if isinstance(value, str) else value
            assert isinstance(token, bytes) and len(token) == int(length), f"bad vocab line {line[:60]!r}"
            self.ids[token] = int(tid)
        # the lengths of the tokens starting with each byte, longest first
        self.lengths = {}
        for token in self.ids:
            self.lengths.setdefault(token[0], set()).add(len(token))
        self.lengths = {b: sorted(n, reverse=True) for b, n in self.lengths.items()}

    def encode(self, text: str) -> list:
        data, i, out = text.encode("utf-8"), 0, []
        while i < len(data):
            for n in (n for n in self.lengths[data[i]] if i + n <= len(data)):
                tid = self.ids.get(data[i:i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                raise AssertionError(f"no token for byte {data[i]:#x}: not the World vocabulary")
        return out


def encode(text: str) -> list:
    tok = MANIFEST["tokenizer"]
    if tok["kind"] == "bytes":
        return list(text.encode("utf-8"))
    if tok["kind"] == "rwkv-world":
        data = bundle_file(ROOT, tok["file"]).read_bytes()
        entry = next(f for f in MANIFEST["files"] if f["file"] == tok["file"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{tok['file']} is damaged"
        return WorldVocab(data).encode(text)
    assert tok["kind"] == "hf-tokenizers", f"unknown tokenizer kind {tok['kind']!r}"
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle_file(ROOT, tok["file"]))).encode(text).ids


class OrtModel:
    def __init__(self, data: bytes, graph: dict):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.graph = graph

    def run(self, feeds: dict) -> dict:
        names = [o["name"] for o in self.graph["outputs"]]
        return dict(zip(names, self.sess.run(names, feeds)))


class TFLiteModel:
    def __init__(self, data: bytes, graph: dict):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=data)
        self.runner = self.interp.get_signature_runner(graph.get("signature", "step"))

    def run(self, feeds: dict) -> dict:
        return self.runner(**feeds)


DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "float16": np.float16}

if __name__ == "__main__":
    ROOT = Path(sys.argv[1])
    prompt, n = sys.argv[2], int(sys.argv[3])
    variant = sys.argv[4] if len(sys.argv) > 4 else "fp32"
    MANIFEST = json.loads((ROOT / "manifest.json").read_text())
    graph = next(g for g in MANIFEST["graphs"] if g["kind"] == "step" and g["variant"] == variant)
    data = read_model_bytes(ROOT, graph)
    model = TFLiteModel(data, graph) if graph["format"] == "tflite" else OrtModel(data, graph)

    token_in = next(i for i in graph["inputs"] if i["role"] == "token")
    logits_out = next(o for o in graph["outputs"] if o["role"] == "logits")
    state_in = {i["state"]: i for i in graph["inputs"] if i["role"] == "state"}
    state_out = {o["state"]: o for o in graph["outputs"] if o["role"] == "state"}
    state = {t["name"]: np.full(t["shape"], t["init"], dtype=DTYPES[t["dtype"]]) for t in MANIFEST["state"]["tensors"]}

    def step(token: int) -> np.ndarray:
        feeds = {token_in["name"]: np.array([token], dtype=DTYPES[token_in["dtype"]])}
        feeds.update({state_in[s]["name"]: state[s] for s in state})
        out = model.run(feeds)
        for s in state:
            state[s] = out[state_out[s]["name"]]
        return out[logits_out["name"]]

    prompt_ids = encode(prompt)
    seq = next((g for g in MANIFEST["graphs"] if g["kind"] == "sequence" and g["variant"] == variant), None)
    if seq is not None:  # the prompt graph: the whole prompt in chunks of at most (fixed: exactly) max_chunk tokens
        seq_data = data if seq["file"] == graph["file"] else read_model_bytes(ROOT, seq)
        seq_model = TFLiteModel(seq_data, seq) if seq["format"] == "tflite" else OrtModel(seq_data, seq)
        tokens_in = next(i for i in seq["inputs"] if i["role"] == "tokens")
        seq_state_in = {i["state"]: i for i in seq["inputs"] if i["role"] == "state"}
        seq_state_out = {o["state"]: o for o in seq["outputs"] if o["role"] == "state"}
        seq_logits = next(o for o in seq["outputs"] if o["role"] == "logits")
        size = seq["max_chunk"]
        whole = len(prompt_ids) // size * size if seq.get("fixed_chunk") else len(prompt_ids)
        for start in range(0, whole, size):
            chunk = prompt_ids[start:start + size]
            feeds = {tokens_in["name"]: np.array(chunk, dtype=DTYPES[tokens_in["dtype"]])}
            feeds.update({seq_state_in[s]["name"]: state[s] for s in state})
            out = seq_model.run(feeds)
            for s in state:
                state[s] = out[seq_state_out[s]["name"]]
            logits = out[seq_logits["name"]][-1:]
        for t in prompt_ids[whole:]:  # a fixed-chunk graph: the tail token by token
            logits = step(t)
    else:
        for t in prompt_ids:
            logits = step(t)
    ids = []
    for _ in range(n):
        nxt = int(np.argmax(logits))
        ids.append(nxt)
        logits = step(nxt)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("rwkv_export", "runtime_ref"))
    print(json.dumps({"ids": ids, "prompt_ids": prompt_ids, "leaked_modules": leaked,
                      "prompt_graph": seq["file"] if seq else None}))
