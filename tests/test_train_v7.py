"""The tiny-pydoc-v7 trainer (rwkv_export/arch/rwkv7/train.py) and the committed RWKV-7 model it made."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from runtime_ref.rwkv7 import RWKV7, RWKV7Config, expected_shapes
from rwkv_export.arch.rwkv7.synthetic import SyntheticConfig7, make_state_dict
from rwkv_export.arch.rwkv7.train import (
    MODEL_FILE,
    TrainConfig,
    batched_forward,
    init_state_dict,
    main,
    new_batched_state,
    train,
)
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.corpus import EVAL_TEXT, TRAIN_TEXT, eval_loss, read_text_bytes, unigram_entropy_ppl

MAX_MODEL_BYTES = 3 * 1024**2  # the budget for a committed test model (as tiny-pydoc's)
# "Actually learned": the eval text's own byte frequencies (the best any context-free model can do on it) give a
# perplexity of ~20 per byte; a model that only learned frequencies would sit near that. Well below = under half.
MAX_PPL_VS_UNIGRAM = 0.5
EVAL_BYTES = 2500  # runtime_ref's per-token GPT loop is slow (~10 ms/byte here); enough for a stable perplexity
# From a near-uniform init (~5.5 nats) a few steps on real text must cut the loss by far more than step noise.
MIN_LOSS_DROP = 0.5
# chunked WKV vs the reference's token loop: the same sums in a different order, fp32 rounding only (~3e-6 seen
# on logits of size ~4 and a state of size ~9)
BATCHED_ATOL = 5e-5

# 2 heads of 32, 2 layers (v_first crosses a layer), small ranks: a fast model with every x070 tensor
SMALL = TrainConfig(n_layer=2, n_embd=64, head_size=32, ffn_dim=128, d_decay=8, d_aaa=8, d_mv=4, d_gate=16,
                    ctx=16, batch=8, steps=8, warmup=2, chunk=16, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """As the trainer runs: many tiny ops, where a second thread on a shared 2-core box costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_bytes():
    return read_text_bytes(TRAIN_TEXT)


@pytest.fixture(scope="module")
def eval_bytes():
    return read_text_bytes(EVAL_TEXT)


@pytest.mark.parametrize("chunk", [16, 5, 64])
def test_batched_path_equals_forward_seq(chunk):
    """batched_forward is runtime_ref's GPT mode: same logits, state and gradients as RWKV7.forward_seq per row.

    T = 24 covers a whole chunk and a partial last one (16: 16+8), many chunks (5: 5 chunks, the last of 4) and one
    chunk longer than T (64).
    """
    torch.manual_seed(0)
    sd = init_state_dict(SMALL)
    sd["head.weight"] = sd["head.weight"] * 3  # the synthetic spread of logits, so differences would show
    model = RWKV7(sd)
    tokens = torch.randint(0, 256, (3, 24))
    state = new_batched_state(model, 3)
    _, s1 = model.forward_seq(tokens[1, :9], model.new_state())  # a non-fresh state for row 1: state goes in per row
    for k in state:
        state[k][1] = s1[k]
    assert float(state["att_kv"][1].abs().max()) > 0.1

    model.requires_grad_(True)
    logits, new = batched_forward(model, tokens, state, chunk)
    weights = torch.randn(logits.shape)
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref_total = 0
    for b in range(3):
        ref_logits, ref_new = model.forward_seq(tokens[b], {k: v[b] for k, v in state.items()}, all_logits=True)
        ref_total = ref_total + (ref_logits * weights[b]).sum()
        torch.testing.assert_close(logits[b].detach(), ref_logits.detach(), atol=BATCHED_ATOL, rtol=0)
        for k in ref_new:
            torch.testing.assert_close(new[k][b].detach(), ref_new[k].detach(), atol=BATCHED_ATOL, rtol=0)
    ref_total.backward()
    for n, p in model.named_parameters():  # what training follows is the reference's gradient too
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4 * max(scale, 1.0), rtol=1e-3, msg=n)


def test_short_training_lowers_the_loss(train_bytes, eval_bytes):
    init = init_state_dict(SMALL)
    before = eval_loss(RWKV7(init), eval_bytes[:600])
    model, losses = train(SMALL, train_bytes, init=init)
    after = eval_loss(model, eval_bytes[:600])
    assert len(losses) == SMALL.steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - MIN_LOSS_DROP, losses
    assert after < before - MIN_LOSS_DROP, (before, after)  # held-out text: it learned, not memorised a batch


def test_committed_model_is_x070(eval_bytes):
    assert MODEL_FILE.stat().st_size <= MAX_MODEL_BYTES
    with safe_open(str(MODEL_FILE), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    cfg = TrainConfig(**json.loads(meta["config"]))
    # the layout synthetic.py writes for these dimensions (BlinkDL's x070 keys), tensor for tensor
    syn = make_state_dict(SyntheticConfig7(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size,
                                           ffn_dim=cfg.ffn_dim, vocab_size=256, d_decay=cfg.d_decay,
                                           d_aaa=cfg.d_aaa, d_mv=cfg.d_mv, d_gate=cfg.d_gate))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in syn.items()}
    # and the reference's own table
    ref_cfg = RWKV7Config.from_state_dict(sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(ref_cfg)
    assert (ref_cfg.n_head, ref_cfg.head_size, ref_cfg.vocab_size) == (cfg.n_embd // cfg.head_size, 64, 256)
    ckpt = load_checkpoint(MODEL_FILE)  # the exporter's strict loader reads it as RWKV-7
    assert ckpt.version == "7" and ckpt.dims.vocab_size == 256 and ckpt.source_dtype == "bfloat16"


def test_committed_model_learned(eval_bytes):
    text = eval_bytes[:EVAL_BYTES]
    ppl = math.exp(eval_loss(RWKV7.from_checkpoint(MODEL_FILE), text))
    baseline = unigram_entropy_ppl(text)
    assert ppl < MAX_PPL_VS_UNIGRAM * baseline, (ppl, baseline)


def _small_args(tmp_path, out):
    args = ["--out", str(out), "--eval-text", str(tmp_path / "eval.txt")]
    for field, value in vars(replace(SMALL, steps=2)).items():
        args += ["--" + field.replace("_", "-"), str(value)]
    return args


def test_same_command_same_bytes(tmp_path, eval_bytes, capsys):
    (tmp_path / "eval.txt").write_bytes(eval_bytes[:300])
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(_small_args(tmp_path, a)) == 0
    assert main(_small_args(tmp_path, b)) == 0
    assert a.read_bytes() == b.read_bytes()  # safetensors' own writer orders the metadata at random
    with safe_open(str(a), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["steps"] == 2 and meta["dtype"] == "bfloat16"
    assert math.isfinite(json.loads(meta["result"])["eval_loss"])
    RWKV7.from_checkpoint(a)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["--train-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: ") and "missing.txt" in err[0]
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"too short")
    code = main(["--train-text", str(tiny), "--out", str(tmp_path / "m.safetensors"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("error: ") and "too short" in err[-1]
    code = main(["--head-size", "48", "--out", str(tmp_path / "m.safetensors")])  # 128 is not a multiple of 48
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("error: ") and "head_size" in err[-1]
    assert not (tmp_path / "m.safetensors").exists()
