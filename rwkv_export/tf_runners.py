"""Runners for the edge targets, with OnnxStepRunner's interface (new_state / step), driven by the manifest alone:

- TFLiteStepRunner: the `.tflite` in the LiteRT interpreter (ai-edge-litert), through its named signature;
- TFLiteSequenceRunner: the prompt graph's `prefill` signature (prompt chunks of a fixed size; the tail through `step`);
- TFJSStepRunner: the TF.js graph model in Node with @tensorflow/tfjs on its wasm backend (SIMD, one thread), or the
  pure-JS CPU backend where asked for or where wasm cannot initialise (said on stderr, never silently). One Node
  process per runner, kept alive and fed one request per step (rwkv_export/js/tfjs_step.mjs: a JSON line and the
  state's float32 bytes; the answer likewise), so a 96-step parity run is one launch. Its npm packages are found or
  installed by rwkv_export.node (a checkout's or the user cache's).

Also `quality`, the measures quantized variants are judged by (top-1 agreement and KL against a reference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import ManifestError, RwkvExportError
from .memory import give_back_freed_memory
from .node import JS_DIR, npm_packages
from .node import require_node as _require_node
from .runners import io_by_role, new_state_from_manifest, step_feeds

NODE_DIR = JS_DIR  # the driver, with package.json + lockfile (a checkout: `npm ci --prefix rwkv_export/js`)
NODE_SCRIPT = "tfjs_step.mjs"
TFJS_PROBE = "@tensorflow/tfjs-converter"
# The TF.js backend the Node driver runs on: "wasm" (SIMD binary, read from the installed package) or "cpu" (pure JS).
# $RWKV_EXPORT_TFJS_BACKEND picks one for every runner a command starts (e.g. `cpu` to rule the wasm build out).
TFJS_BACKENDS = ("wasm", "cpu")
TFJS_BACKEND_ENV = "RWKV_EXPORT_TFJS_BACKEND"


def tfjs_backend(backend: str | None = None) -> str:
    backend = backend or os.environ.get(TFJS_BACKEND_ENV) or "wasm"
    if backend not in TFJS_BACKENDS:
        raise RwkvExportError(f"unknown TF.js backend {backend!r} (${TFJS_BACKEND_ENV} or backend=): "
                              f"use one of {', '.join(TFJS_BACKENDS)}")
    return backend


def _tflite_signature(root: Path, graph: dict, threads: int | None, interpreter=None, default: str = "step"):
    """(interpreter, signature runner) for a manifest graph entry; `interpreter` reuses one already loaded."""
    from .targets.tflite import _interpreter

    if interpreter is None:
        path = Path(root) / graph["file"]
        if not path.is_file():
            raise ManifestError(f"{graph['file']} is listed in the manifest but missing from {root}")
        interpreter = _interpreter(path, threads)
    sigs = interpreter.get_signature_list()
    name = graph.get("signature", default)
    if name not in sigs:
        raise ManifestError(f"{graph['file']} has no signature '{name}' (has {', '.join(sigs) or 'none'})")
    return interpreter, interpreter.get_signature_runner(name)


class TFLiteStepRunner:
    def __init__(self, root: Path, manifest: dict, graph: dict, threads: int | None = None, interpreter=None):
        self.manifest, self.graph = manifest, graph
        self.io = io_by_role(graph)
        self.interpreter, self.runner = _tflite_signature(root, graph, threads, interpreter)

    def new_state(self) -> dict:
        return new_state_from_manifest(self.manifest, self.graph)

    def step(self, token: int, state: dict):
        outs = self.runner(**step_feeds(self.io, token, state))
        # the interpreter reuses its output buffers: copy before the next call overwrites them
        logits = np.array(outs[self.io["logits"]["name"]])
        return logits, {s: np.array(outs[self.io["state_out"][s]["name"]]) for s in self.io["state_in"]}


class TFLiteSequenceRunner:
    """new_state() / forward(tokens, state) -> (logits [1, V] of the last token, state) over a TFLite prompt graph:
    whole chunks of the graph's fixed size through its signature, the tail (fewer tokens than a chunk) through the
    step graph of the same variant: its own file (an export writes one signature per file), or the same file, whose
    interpreter then serves both signatures (a folder from before that split).

    `one_interpreter`: hold one of the two files' interpreters at a time, closing the prompt graph's before the step
    graph's opens and the other way round (a check does: each fp32 interpreter at 169M shapes is ~1.06 GB while
    XNNPACK packs its weights, the mapped file's pages plus the packed copy, so the pair held 2.6 GB). The logits
    are the same; each switch costs a load (~0.7 s at 169M fp32). Default: both stay open (prompting, then
    generating token by token, as an app does)."""

    def __init__(self, root: Path, manifest: dict, graph: dict, threads: int | None = None,
                 one_interpreter: bool = False):
        from .seq_runner import sequence_io

        self.manifest, self.graph = manifest, graph
        self.io = sequence_io(graph)
        self.chunk = self.io["max_chunk"]
        self.vocab_size = int(manifest["model"]["vocab_size"])
        step = [g for g in manifest["graphs"] if g["kind"] == "step" and g["format"] == graph["format"]
                and g["variant"] == graph["variant"]]
        if not step:
            raise ManifestError(f"graph {graph['file']} ({graph['variant']}): no step graph of that variant, for the "
                                "tokens after the last whole chunk")
        self._root, self._threads, self._step_graph = Path(root), threads, step[0]
        self._shared = step[0]["file"] == graph["file"]
        self._one = one_interpreter and not self._shared
        self.interpreter = self.runner = self._step = None
        self._open_prefill()
        if not self._one:
            self._open_step()
        self._states = list(self.io["state_in"])
        self._tokens_dtype = np.dtype(self.io["tokens"]["dtype"])

    def _open_prefill(self):
        if self.runner is None:
            if self._one and self._step is not None:
                self._step = None
                give_back_freed_memory()
            self.interpreter, self.runner = _tflite_signature(self._root, self.graph, self._threads,
                                                              default="prefill")
        return self.runner

    def _open_step(self) -> "TFLiteStepRunner":
        if self._step is None:
            if self._one and self.runner is not None:
                self.interpreter = self.runner = None
                give_back_freed_memory()
            shared = self.interpreter if self._shared else None
            self._step = TFLiteStepRunner(self._root, self.manifest, self._step_graph, self._threads,
                                          interpreter=shared)
        return self._step

    @property
    def step_runner(self) -> "TFLiteStepRunner":
        """The step graph's runner (the tail of a prompt, or tokens after it), opened if it is not."""
        return self._open_step()

    def new_state(self) -> dict:
        return new_state_from_manifest(self.manifest, self._step_graph)

    def forward(self, tokens, state: dict):
        """Feed the tokens from `state` (not modified); return the last token's logits [1, V] and the state after."""
        from .seq_runner import check_tokens

        arr = check_tokens(tokens, self.vocab_size, self._tokens_dtype)
        missing = [s for s in self._states if s not in state]
        if missing:
            raise RwkvExportError(f"state is missing {missing}")
        whole = len(arr) // self.chunk * self.chunk
        logits = None
        for start in range(0, whole, self.chunk):
            feeds = {self.io["tokens"]["name"]: arr[start:start + self.chunk]}
            feeds.update({self.io["state_in"][s]["name"]: state[s] for s in self._states})
            outs = self._open_prefill()(**feeds)
            # the interpreter reuses its output buffers: copy before the next call overwrites them
            logits = np.array(outs[self.io["logits"]["name"]])[-1:]
            state = {s: np.array(outs[self.io["state_out"][s]["name"]]) for s in self._states}
        for t in arr[whole:]:
            logits, state = self._open_step().step(int(t), state)
        return logits, state

    def close(self) -> None:
        self.interpreter = self.runner = self._step = None
        give_back_freed_memory()


def _f32_bytes(a: np.ndarray) -> bytes:
    """An array's float32 bytes, little-endian: the driver's wire format for state (tfjs_step.mjs)."""
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def require_node(node_dir: Path | None = None) -> tuple[str, Path]:
    """(the `node` executable, the folder whose node_modules holds @tensorflow/tfjs). With `node_dir`, the packages
    must already be installed there; without, they are found or installed on first use (rwkv_export.node)."""
    what = "running a TF.js model"
    node = _require_node(what)
    if node_dir is None:
        return node, npm_packages(JS_DIR, TFJS_PROBE, what)
    node_dir = Path(node_dir)
    if not (node_dir / "node_modules" / TFJS_PROBE).is_dir():
        raise RwkvExportError(f"{what} needs @tensorflow/tfjs in {node_dir}: run `npm ci --prefix {node_dir}`")
    return node, node_dir


class TFJSStepRunner:
    """The TF.js graph model in a persistent Node process. Close it (or use `with`) to end the process.

    `backend` ("wasm", the default, or "cpu"; None: $RWKV_EXPORT_TFJS_BACKEND or wasm) is the one asked for;
    `self.backend` is the one running, `self.fallback` why wasm could not initialise (None when it did), and
    `self.engine` says both in words for stage lines. `decoder="tfjs"` has the driver decode the weights with
    tf.io.decodeWeights instead of its own faster decoder (the same values: tests/test_tfjs_node_speed.py)."""

    def __init__(self, root: Path, manifest: dict, graph: dict, node_dir: Path | None = None, timeout: float = 600,
                 backend: str | None = None, decoder: str | None = None):
        self.manifest, self.graph = manifest, graph
        self.io = io_by_role(graph)
        self.timeout = timeout
        self.node_rss_mb = None
        want = tfjs_backend(backend)
        node, packages = require_node(node_dir)
        model = (Path(root) / graph["file"]).absolute()  # Node runs in another folder: a relative path would not do
        if not model.is_file():
            raise ManifestError(f"{graph['file']} is listed in the manifest but missing from {root}")
        self._shapes = {o["state"]: o["shape"] for o in graph["outputs"] if o["role"] == "state"}
        self._logits_shape = self.io["logits"]["shape"]
        hidden = [o for o in graph["outputs"] if o["role"] == "hidden"]  # an export made with --embedding
        self._hidden_shape = hidden[0]["shape"] if hidden else None
        # stderr to a file, not a pipe: nobody drains it while stepping, and a full pipe would block Node
        self._stderr = tempfile.TemporaryFile(mode="w+")
        # --expose-gc: the driver collects the shards it has copied into the wasm heap as it loads (tfjs_step.mjs)
        self.proc = subprocess.Popen([node, "--expose-gc", str(JS_DIR / NODE_SCRIPT), str(model), str(packages), want,
                                      *([decoder] if decoder else [])],
                                     cwd=packages, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        hello = self._read()
        self.backend, self.fallback = hello.get("backend"), hello.get("fallback")
        self.decoder = hello.get("decoder")  # "fast" (tfjs_step.mjs's decodeWeights) or "tfjs" (tf.io.decodeWeights)
        if self.backend == "wasm":
            self.engine = f"TF.js wasm backend ({'SIMD' if hello.get('simd') else 'no SIMD'}, 1 thread)"
        else:
            self.engine = "TF.js pure-JS cpu backend"
        if self.fallback:
            self.engine += f" (wasm could not initialise: {self.fallback})"
            hint = (f"; `npm ci --prefix {packages}` installs the locked packages" if "Cannot find module"
                    in self.fallback else "")
            print(f"rwkv-export: {graph['file']}: TF.js's wasm backend could not initialise ({self.fallback}); "
                  f"running on the pure-JS cpu backend, several times slower{hint}", file=sys.stderr, flush=True)
        elif self.backend != want:
            self.close()
            raise RwkvExportError(f"TF.js ({graph['file']}): asked for the {want} backend, Node runs {self.backend}")
        if bool(hello.get("hidden")) != bool(hidden):
            self.close()
            raise ManifestError(f"{graph['file']}: model.json's signature {'has' if hello.get('hidden') else 'lacks'} "
                                f"a `hidden` output, the manifest {'lists' if hidden else 'does not list'} one")
        if set(hello.get("states", [])) != set(self.io["state_in"]):
            self.close()
            raise ManifestError(f"{graph['file']}: model.json's signature states {hello.get('states')} differ from "
                                f"the manifest's {sorted(self.io['state_in'])}")
        # Node keys the states by the signature's input names, which the manifest records as each input's name
        self._by_input = {spec["name"]: s for s, spec in self.io["state_in"].items()}
        self._wire = [self._by_input[k] for k in hello["states"]]  # the states in the order their bytes travel
        for s, n in zip(self._wire, hello["sizes"]):
            if n != int(np.prod(self._shapes[s])):
                self.close()
                raise ManifestError(f"{graph['file']}: model.json's state {s} has {n} values, the manifest's shape "
                                    f"{self._shapes[s]} {int(np.prod(self._shapes[s]))}")

    def _read(self) -> dict:
        """The next answer: its JSON line, and each of the `arrays` it announces (float32, flat, read from the bytes
        after the line) under its name; an error answer raises."""
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            self._stderr.seek(0)
            last = (self._stderr.read().strip().splitlines() or ["(no output)"])[-1]
            raise RwkvExportError(f"the TF.js Node process ended without answering: {last}")
        msg = json.loads(line)
        if "error" in msg:
            raise RwkvExportError(f"TF.js ({self.graph['file']}): {msg['error']}")
        if "arrays" in msg:
            buf = bytearray(msg["bytes"])  # writable, as the arrays must be: they are views of it
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = self.proc.stdout.readinto(view[got:])
                if not n:
                    self.close()
                    raise RwkvExportError(f"the TF.js Node process ended {len(buf) - got} bytes into an answer")
                got += n
            at = 0
            for name, count in msg.pop("arrays"):
                msg[name] = np.frombuffer(buf, dtype="<f4", count=count, offset=at)
                at += 4 * count
            if at != len(buf):
                raise RwkvExportError(f"TF.js ({self.graph['file']}): an answer's arrays take {at} of its "
                                      f"{len(buf)} bytes")
        return msg

    def _ask(self, req: dict) -> dict:
        """Send `req`, its "state" (_state_req's bytes) after its line, and read the answer (_read)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RwkvExportError("the TF.js Node process is not running")
        req = dict(req)
        payload = req.pop("state", b"")
        self.proc.stdin.write(json.dumps({**req, "bytes": len(payload)}).encode() + b"\n" + payload)
        self.proc.stdin.flush()
        return self._read()

    def _state_req(self, state: dict) -> bytes:
        return b"".join(_f32_bytes(state[s]) for s in self._wire)

    def _state_resp(self, msg: dict) -> dict:
        """The state in an answer (_read's arrays, under Node's names), shaped as the manifest says."""
        return {s: msg[k].reshape(self._shapes[s]) for k, s in self._by_input.items()}

    def new_state(self) -> dict:
        return new_state_from_manifest(self.manifest, self.graph)

    def step(self, token: int, state: dict):
        logits, state, _ = self.step_hidden(token, state)
        return logits, state

    def step_hidden(self, token: int, state: dict):
        """step(), plus the `hidden` output [1, C] of a graph exported with --embedding (None without)."""
        r = self._ask({"op": "step", "token": int(token), "state": self._state_req(state)})
        hidden = r["hidden"].reshape(self._hidden_shape) if self._hidden_shape else None
        return r["logits"].reshape(self._logits_shape), self._state_resp(r), hidden

    def greedy(self, token: int, n: int, state: dict) -> tuple[list[int], float, dict]:
        """n greedy steps inside Node (no per-step IPC): (tokens, seconds spent in Node, final state).
        The Node process's resident memory afterwards (MB) is kept in `self.node_rss_mb`."""
        r = self._ask({"op": "greedy", "token": int(token), "n": int(n), "state": self._state_req(state)})
        self.node_rss_mb = r.get("rss_mb")
        return r["tokens"], r["seconds"], self._state_resp(r)

    def close(self) -> None:
        p, self.proc = getattr(self, "proc", None), None
        if p is not None and p.poll() is None:
            p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quality(runner, ref, tokens: list[int]) -> dict:
    """Teacher-forced over `tokens`, each side carrying its own state: top-1 agreement with `ref` and KL(ref || runner)
    of the next-token distributions (mean and max over steps, in nats). `ref` is a runner too (e.g. ReferenceRunner or
    another export), so a quantized variant can be judged against the reference or against its own fp32 export."""
    ms, rs = runner.new_state(), ref.new_state()
    top1, kls = 0, []
    for tok in tokens:
        m, ms = runner.step(tok, ms)
        r, rs = ref.step(tok, rs)
        m = np.asarray(m, np.float64).reshape(-1)
        r = np.asarray(r, np.float64).reshape(-1)
        lr, lm = _log_softmax(r), _log_softmax(m)
        kls.append(float((np.exp(lr) * (lr - lm)).sum()))
        top1 += int(m.argmax() == r.argmax())
    return {"tokens": len(tokens), "top1_agreement": top1 / len(tokens), "kl_mean": float(np.mean(kls)),
            "kl_max": float(np.max(kls))}
