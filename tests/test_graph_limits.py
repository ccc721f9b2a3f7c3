"""Graph limits: no node of an exported step or prompt graph has more than MAX_NODE_IO inputs + outputs, whatever
the layer count (onnxruntime-web's WebGPU EP binds each as a storage buffer, at most 16 per shader: arch/base.py),
and the grouped state split / concat still computes the model (parity against runtime_ref at the fp32 tolerance)."""

from __future__ import annotations

import onnx
import pytest
import torch

from rwkv_export.arch.base import GROUP, MAX_NODE_IO, cat_grouped, split_grouped
from rwkv_export.checkpoint import from_state_dict
from rwkv_export.manifest import new_manifest
from rwkv_export.parity import compare, compare_sequence, gate, parity_tokens
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.seq_runner import OnnxSequenceRunner
from rwkv_export.synthetic import make_state_dict
from rwkv_export.targets import onnx as onnx_target
from rwkv_export.targets import onnx_seq

# RWKV-4 430M has 24 layers: its one Concat of the layers' state rows took 25 buffers on WebGPU. 14 is the fewest
# layers whose one Split (data + split sizes in, 14 rows out: 16) would pass MAX_NODE_IO, so the grouped path is taken
# and an ungrouped graph would fail here; 24 builds the same grouped shapes at twice the export time.
N_LAYER = 14
# tiny widths (the node count does not depend on them) and short prompt chunks, so that the graphs export quickly
TINY = {
    "4": dict(n_embd=32, ffn_dim=64, vocab_size=64),
    "7": dict(n_embd=64, head_size=32, ffn_dim=128, vocab_size=64, d_decay=8, d_aaa=8, d_mv=8, d_gate=8),
}
MAX_CHUNK = {"4": 7, "7": 8}
N_TOKENS = 12  # parity tokens: the state fed back 12 times through each of the layers
N_GREEDY = 4


@pytest.mark.parametrize("n", [1, 3, GROUP, GROUP + 1, MAX_NODE_IO - 2, MAX_NODE_IO - 1, 24, 65, 200])
def test_grouped_split_and_concat_are_the_plain_ones(n):
    x = torch.randn(n, 3)
    rows = split_grouped(x)
    assert len(rows) == n and all(torch.equal(r, x[i:i + 1]) for i, r in enumerate(rows))
    assert torch.equal(cat_grouped(rows), x)


@pytest.fixture(scope="module", params=["4", "7"])
def exported(request, tmp_path_factory):
    torch.set_num_threads(1)
    version = request.param
    ckpt = from_state_dict(make_state_dict(version, "tiny", seed=3, n_layer=N_LAYER, **TINY[version]))
    step = ckpt.arch.step_module(ckpt, "fp32").eval()
    root = tmp_path_factory.mktemp(f"limits_v{version}")
    onnx_target.export_step(step, root / "model.onnx")
    files = onnx_seq.export_sequence(step, root / "prefill.onnx", max_chunk=MAX_CHUNK[version])
    manifest = new_manifest(arch=step.arch, dims=step.dims, source={}, tokenizer={})
    inputs, outputs, opset = onnx_target.io_spec(root / "model.onnx")
    manifest["graphs"] += [{"name": "step", "kind": "step", "format": "onnx", "variant": "fp32", "file": "model.onnx",
                            "data_files": [], "opset": opset, "inputs": inputs, "outputs": outputs, "parity": None},
                           onnx_seq.graph_entry(root / "prefill.onnx", files=files)]
    return root, manifest, ckpt


@pytest.mark.parametrize("file", ["model.onnx", "prefill.onnx"])
def test_no_node_has_more_buffers_than_webgpu_binds(exported, file):
    root = exported[0]
    graph = onnx.load(str(root / file), load_external_data=False).graph
    worst = max(graph.node, key=lambda n: len(n.input) + len(n.output))
    assert len(worst.input) + len(worst.output) <= MAX_NODE_IO, (
        f"{worst.op_type} {worst.name}: {len(worst.input)} inputs + {len(worst.output)} outputs")


def test_grouped_graphs_match_the_reference(exported):
    root, manifest, ckpt = exported
    ref = ckpt.arch.reference(ckpt.tensors, dtype=torch.float64)
    tokens = parity_tokens(ckpt.dims.vocab_size, N_TOKENS)
    step_graph, seq_graph = manifest["graphs"]
    step_report = compare(OnnxStepRunner(root, manifest, step_graph, threads=1), ref, target="onnx", variant="fp32",
                          tokens=tokens, n_greedy=N_GREEDY)
    gate(step_report)  # raises ParityToleranceError / ParityGreedyError past the fp32 tolerance (parity.py)
    seq_report = compare_sequence(OnnxSequenceRunner(root, manifest, seq_graph, threads=1), ref, target="onnx",
                                  variant="fp32", tokens=tokens)
    gate(seq_report)
