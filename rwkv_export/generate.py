"""`rwkv-export generate`: stream text from an export folder (its ONNX step graph) or from a checkpoint (runtime_ref)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import RwkvExportError
from .progress import QUIET, Progress


@dataclass
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float
    prompt_mode: str
    generated_tokens: int
    generate_seconds: float
    token_ids: list

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else float("nan")


def check_prompt(prompt: str) -> None:
    """A prompt the tokenizers can take: not empty, valid UTF-8 (an argument with invalid UTF-8 bytes reaches Python
    as lone surrogates, which no encoder takes)."""
    if not prompt:
        raise RwkvExportError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(prompt[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise RwkvExportError(f"the prompt is not valid UTF-8 ({what} at character {e.start})") from None


def open_model(target: str, *, variant: str | None = None, tokenizer: str | None = None,
               progress: Progress = QUIET):
    """An export folder -> (ONNX runner, tokenizer); a checkpoint or builtin:NAME -> (runtime_ref runner, tokenizer).

    When the folder has a prompt (sequence) graph of the chosen variant, the runner gets it as `runner.prompt`
    (OnnxSequenceRunner: `forward(tokens, state)`), and generate() feeds prompts through it in chunks."""
    from .tokenizer import load_tokenizer, resolve_tokenizer, spec_from_manifest

    p = Path(target)
    if p.is_dir():
        from .manifest import find_graph, read_manifest
        from .runners import OnnxStepRunner

        manifest = read_manifest(p)
        graph = find_graph(manifest, variant)
        if graph["format"] not in ("onnx", "ort"):
            raise RwkvExportError(f"generate runs ONNX/ORT graphs; {graph['file']} is {graph['format']} "
                                  f"(check it with `rwkv-export check {p}`)")
        runner = OnnxStepRunner(p, manifest, graph)
        seq = [g for g in manifest["graphs"] if g["kind"] == "sequence" and g["variant"] == graph["variant"]
               and g["format"] == graph["format"]]
        if seq:
            from .seq_runner import OnnxSequenceRunner

            runner.prompt = OnnxSequenceRunner(p, manifest, seq[0])
        if tokenizer is not None:
            spec = resolve_tokenizer(manifest["model"]["vocab_size"], tokenizer)
        else:
            spec = spec_from_manifest(p, manifest["tokenizer"])
        return runner, load_tokenizer(spec)
    from .runners import ReferenceRunner
    from .sources import Source

    ckpt = Source(target).load(progress)
    return ReferenceRunner(ckpt), load_tokenizer(resolve_tokenizer(ckpt.dims.vocab_size, tokenizer))


def generate(runner, tokenizer, prompt: str, *, max_tokens: int = 100, temperature: float = 1.0, top_p: float = 0.85,
             min_p_ratio: float = 0.02, min_p_power: float = 2.0, seed: int = 0, stop_at_eos: bool = True,
             on_text: Callable[[str], None] = lambda s: None) -> GenerationStats:
    import torch
    from runtime_ref import sample_logits

    from .tokenizer import StreamDecoder

    check_prompt(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise RwkvExportError("the prompt is empty (it encodes to no tokens)")
    gen = torch.Generator().manual_seed(seed)
    state = runner.new_state()
    t0 = time.perf_counter()
    prompt_runner = getattr(runner, "prompt", None)
    if prompt_runner is not None:  # GPT mode: the whole prompt in chunks of the graph's max_chunk
        logits, state = prompt_runner.forward(ids, state)
    else:
        for tok in ids:
            logits, state = runner.step(tok, state)
    t1 = time.perf_counter()
    out: list[int] = []
    dec = StreamDecoder(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    for _ in range(max_tokens):
        tok = sample_logits(torch.from_numpy(logits.reshape(-1)), temperature=temperature, top_p=top_p,
                            min_p_ratio=min_p_ratio, min_p_power=min_p_power, generator=gen)
        if stop_at_eos and eos is not None and tok == eos:
            break
        out.append(tok)
        on_text(dec.push(tok))
        logits, state = runner.step(tok, state)
    on_text(dec.flush())
    t2 = time.perf_counter()
    mode = "prompt graph" if prompt_runner is not None else "token by token"
    return GenerationStats(len(ids), t1 - t0, mode, len(out), t2 - t1, out)
