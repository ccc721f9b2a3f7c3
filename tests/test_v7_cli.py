"""RWKV-7 through the consumer commands, from the export folder's manifest alone: `rwkv-export onnx builtin:v7-tiny`,
`check` (passes; a damaged graph exits 3), `generate` on the folder and on the checkpoint, and a World-vocab v7 so the
rwkv-world tokenizer runs end to end (export -> manifest -> generate). Expected values come from runtime_ref.rwkv7 in
fp64 and, for World token ids, from the `rwkv` pip package's TRIE_TOKENIZER (the outside oracle), never from the code
under test.

The two exports are made once per pytest session and shared: test_web_demo.py imports `v7_export` from here.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.manifest import MANIFEST_NAME, read_manifest, write_manifest

runner = CliRunner()
N_GREEDY = 32
# more than the v7 prompt graph's max_chunk (64) bytes: `generate` feeds it in two chunks
BYTE_PROMPT = "The state is all the model remembers: att_x, att_kv and ffn_x, one row per layer. " * 2
WORLD_PROMPT = "RWKV-7 在浏览器里运行 🙂 — Привет, мир! The state is all the model remembers; def f(x): return x ** 2"
# a World-vocab RWKV-7 as small as it gets: 2 layers (so v_first crosses one), 2 heads of 16, vocab 65536
WORLD_V7 = dict(vocab_size=65536, n_embd=32, head_size=16, ffn_dim=64, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@contextmanager
def one_torch_thread():
    """Tiny models on a shared 2-core box: two spinning intra-op threads make every step 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def world_v7_checkpoint(path: Path) -> Path:
    from rwkv_export.synthetic import make_checkpoint

    return path if path.is_file() else make_checkpoint(path, "tiny", seed=0, version="7", **WORLD_V7)


def v7_export(tmp_path_factory, which: str) -> Path:
    """The session's v7 export folder, made by `rwkv-export onnx` on first use (later callers, in any module, get the
    same folder). "bytes": builtin:v7-tiny with its prompt graph; "world": the World-vocab checkpoint (`.source`
    beside the folder), step graph only. --no-check: `check` is tested on the folder itself below."""
    root = tmp_path_factory.getbasetemp() / "v7-shared"
    out = root / which
    if (out / MANIFEST_NAME).is_file():
        return out
    root.mkdir(exist_ok=True)
    with one_torch_thread():
        if which == "bytes":
            res = run("onnx", "builtin:v7-tiny", "-o", out, "--no-check", "-q")
        else:
            ckpt = world_v7_checkpoint(root / "world-v7.safetensors")
            res = run("onnx", ckpt, "-o", out, "--no-check", "--no-prefill", "-q")
    assert res.exit_code == 0, res.output
    return out


def world_checkpoint_of(folder: Path) -> Path:
    return folder.parent / "world-v7.safetensors"


@pytest.fixture(scope="module")
def v7(tmp_path_factory) -> Path:
    return v7_export(tmp_path_factory, "bytes")


@pytest.fixture(scope="module")
def v7_world(tmp_path_factory) -> Path:
    return v7_export(tmp_path_factory, "world")


def v7_tiny_reference():
    from runtime_ref.rwkv7 import RWKV7

    from rwkv_export.sources import Source

    return RWKV7(Source("builtin:v7-tiny").load().tensors, dtype=torch.float64)


def world_oracle():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


def greedy_until_eos(ref, prompt_ids: list[int], n: int, eos: int | None) -> list[int]:
    ids, _ = ref.greedy(prompt_ids, n)
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


# ---- the export folder ----------------------------------------------------------------------------------------------


def test_v7_folder_manifest_carries_the_rank4_state(v7):
    """The manifest alone describes the graphs: three state tensors with the reference's own shapes (att_kv rank 4),
    the same shapes on every graph's state inputs and outputs, the byte tokenizer, and a prompt graph."""
    ref = v7_tiny_reference()
    m = read_manifest(v7)
    assert m["model"]["rwkv_version"] == "7" and m["model"]["source"] == {"builtin": "v7-tiny", "dtype": "bfloat16"}
    expected = {k: list(v) for k, v in ref.state_shapes().items()}
    assert {t["name"]: t["shape"] for t in m["state"]["tensors"]} == expected
    assert len(expected["att_kv"]) == 4 and expected["att_kv"] == [2, 2, 64, 64]
    assert m["tokenizer"]["kind"] == "bytes"
    assert [(g["kind"], g["file"]) for g in m["graphs"]] == [("step", "model.onnx"), ("sequence", "prefill.onnx")]
    for g in m["graphs"]:
        for io in (g["inputs"], g["outputs"]):
            assert {x["state"]: x["shape"] for x in io if x["role"] == "state"} == expected, g["file"]
    assert m["graphs"][1]["max_chunk"] == 64


def test_check_passes_on_the_v7_folder(v7):
    res = run("check", v7, "-q")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("PASS") == 2, res.stdout  # the step graph and the prompt graph
    assert "greedy 32/32 identical" in res.stdout and "prompt graph" in res.stdout


def _perturb_initializer(folder: Path, name: str, factor: float) -> None:
    """Scale one weight tensor in place inside the external data file (both graphs read it), then re-list the files in
    the manifest so that sizes and sha256 match: what is left to catch it is the parity gate."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    loc = {e.key: e.value for e in t.external_data}
    off, n = int(loc["offset"]), int(loc["length"])
    path = folder / loc["location"]
    data = bytearray(path.read_bytes())
    w = np.frombuffer(bytes(data[off:off + n]), dtype=np.float32) * np.float32(factor)
    data[off:off + n] = w.tobytes()
    path.write_bytes(bytes(data))
    write_manifest(folder, read_manifest(folder, verify_files=False))


def test_check_a_damaged_v7_graph_exits_3(v7, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(v7, copy)
    # layer 1's decay LoRA: the decays of att_kv change, so the logits drift from the reference's
    _perturb_initializer(copy, "layers.1.w1", 1.5)
    res = run("check", copy, "-q")
    assert res.exit_code == 3, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "exceeds" in err, err
    assert "FAIL" in res.stdout


def test_generate_v7_folder_and_checkpoint_equal_the_reference(v7):
    """`generate` on the folder (prompt graph: two chunks of max_chunk) and on builtin:v7-tiny (runtime_ref): the text
    of the fp64 reference's greedy continuation, and the statistics line says which prompt path ran."""
    prompt_ids = list(BYTE_PROMPT.encode())
    assert len(prompt_ids) > 64
    ids, _ = v7_tiny_reference().greedy(prompt_ids, N_GREEDY)
    expected = BYTE_PROMPT + bytes(ids).decode("utf-8", errors="replace") + "\n"
    for target, mode in ((v7, "prompt graph"), ("builtin:v7-tiny", "token by token")):
        res = run("generate", target, "-p", BYTE_PROMPT, "-n", N_GREEDY, "--temperature", "0")
        assert res.exit_code == 0, res.output
        assert res.stdout == expected, target
        assert f"[prompt {len(prompt_ids)} tokens in " in res.stderr and f"({mode}); generated {N_GREEDY} tokens" \
            in res.stderr, res.stderr


def test_generate_streams_v7_text_piece_by_piece(v7):
    from rwkv_export.generate import generate, open_model

    runner_, tok = open_model(str(v7))
    assert runner_.prompt is not None  # the folder's prompt graph
    pieces: list[str] = []
    stats = generate(runner_, tok, "Hello", max_tokens=N_GREEDY, temperature=0, on_text=pieces.append)
    ids, _ = v7_tiny_reference().greedy(list(b"Hello"), N_GREEDY)
    assert stats.token_ids == ids and stats.prompt_mode == "prompt graph"
    assert len(pieces) == N_GREEDY + 1  # one piece per token (empty while a UTF-8 sequence is open), then the flush
    assert "".join(pieces) == bytes(ids).decode("utf-8", errors="replace")


# ---- a World-vocab RWKV-7 -------------------------------------------------------------------------------------------


def test_world_v7_export_and_generate_end_to_end(v7_world):
    """The World tokenizer from the manifest: the folder carries the vocab, and `generate` on the folder and on the
    checkpoint prints the reference's greedy continuation of the oracle's prompt ids, as World text."""
    from runtime_ref.rwkv7 import RWKV7

    from rwkv_export.tokenizer import WORLD_FILE

    m = read_manifest(v7_world)
    assert m["model"]["rwkv_version"] == "7" and m["model"]["vocab_size"] == 65536
    assert {k: m["tokenizer"][k] for k in ("kind", "file", "vocab_size")} == {
        "kind": "rwkv-world", "file": "rwkv_vocab_v20230424.txt", "vocab_size": 65536}
    assert (v7_world / m["tokenizer"]["file"]).read_bytes() == WORLD_FILE.read_bytes()
    assert [t["shape"] for t in m["state"]["tensors"]] == [[2, 32], [2, 2, 16, 16], [2, 32]]

    oracle = world_oracle()
    ckpt = world_checkpoint_of(v7_world)
    prompt_ids = oracle.encode(WORLD_PROMPT)
    ids = greedy_until_eos(RWKV7.from_checkpoint(ckpt, dtype=torch.float64), prompt_ids, N_GREEDY, eos=0)
    assert len(ids) >= 8  # enough text to compare
    expected = WORLD_PROMPT + oracle.decodeBytes(ids).decode("utf-8", errors="replace") + "\n"
    for target, mode in ((v7_world, "token by token"), (ckpt, "token by token")):
        res = run("generate", target, "-p", WORLD_PROMPT, "-n", N_GREEDY, "--temperature", "0")
        assert res.exit_code == 0, res.output
        assert res.stdout == expected, target
        assert f"[prompt {len(prompt_ids)} tokens in " in res.stderr and f"({mode}); generated {len(ids)} tokens" \
            in res.stderr, res.stderr
