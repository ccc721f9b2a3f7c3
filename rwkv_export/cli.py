"""The `rwkv-export` command line. Thin: each command parses its arguments and calls one library function.

Nothing heavy is imported at module level, so `rwkv-export --help` does not import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import RwkvExportError
from .quantize import DEFAULT_INT4_BLOCK_SIZE, MIN_BLOCK_SIZE  # a light module: stdlib imports only at load time

INT4_BLOCK_HELP = "Block size of int4 (MatMulNBits) quantization; 32 loses ~0.8% less perplexity, ~25% slower."

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help text is plain: `[tflite]` (an extra's name) must print as written, not as markup
    help="Export RWKV language models to edge and browser runtimes (ONNX first), with parity checks against a "
    "PyTorch reference. A model is a .pth/.safetensors checkpoint or builtin:NAME (see `rwkv-export builtins`).",
)

EMBEDDING_HELP = ("Also output the final hidden state (after ln_out) for sentence embeddings: graph outputs `hidden` "
                  "and, in prompt graphs, `hidden_sum` (see `rwkv-export embed`).")
SOURCE_HELP = ("Checkpoint (.pth or .safetensors; RWKV-4, 5.2, 6 or 7, detected from the keys) or builtin:NAME (no "
               "download; see `rwkv-export builtins`).")


def _fail(e: BaseException) -> None:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(getattr(e, "exit_code", 2))


def _check_int4_options(quant: Optional[str], block_size: Optional[int], embedding: bool) -> None:
    """--int4-block-size / --int4-embedding: valid, and only with --quant int4 (not silently ignored)."""
    wants_int4 = "int4" in [q.strip() for q in (quant or "").split(",")]
    for given, name in ((block_size is not None, "--int4-block-size"), (embedding, "--int4-embedding")):
        if given and not wants_int4:
            raise RwkvExportError(f"{name} applies to int4 quantization; add int4 to --quant")
    if block_size is not None and (block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1)):
        raise RwkvExportError(f"--int4-block-size must be a power of two >= {MIN_BLOCK_SIZE}, got {block_size}")


def _check_range(name: str, value, low, high, *, open_low: bool = False) -> None:
    if not ((low < value if open_low else low <= value) and value <= high):  # NaN fails both comparisons too
        raise RwkvExportError(f"{name} must lie in {'(' if open_low else '['}{low}, {high}], got {value}")


def _progress(quiet: bool):
    from .progress import Progress

    return Progress(enabled=not quiet)


CHECK_JOBS_HELP = ("Worker processes that check the step graphs side by side; default: one per core, at most 2. 1: "
                   "one graph after another in this process.")


def _check_jobs_option():
    return typer.Option(None, "--check-jobs", help=CHECK_JOBS_HELP, show_default="cores, at most 2")


def _check_jobs(n: int | None) -> None:
    if n is not None:
        _check_range("--check-jobs", n, 1, 64)


@app.command()
def onnx(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (model.onnx, manifest.json, tokenizer)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json to ship instead of the bundled one, or 'bytes'."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Extra variants, comma-separated: fp16,int8,int4."),
    int4_block_size: Optional[int] = typer.Option(None, help=INT4_BLOCK_HELP, show_default=str(DEFAULT_INT4_BLOCK_SIZE)),
    int4_embedding: bool = typer.Option(False, "--int4-embedding", help="Quantize the embedding table to int4 too."),
    simplify: bool = typer.Option(False, "--simplify", help="Simplify the graph with onnxslim (extra: simplify)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the parity gate before writing (default on)."),
    prefill: bool = typer.Option(True, "--prefill/--no-prefill",
                                 help="Also export the prompt (GPT-mode sequence) graph of each variant."),
    opset: int = typer.Option(18, help="ONNX opset (18 to 24)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
    embedding: bool = typer.Option(False, "--embedding", help=EMBEDDING_HELP),
    check_jobs: Optional[int] = _check_jobs_option(),
):
    """Export CHECKPOINT's RNN-mode step graph to ONNX, check it against the reference, write a folder."""
    try:
        from .check import format_any
        from .export import QuantOptions, export_onnx, parse_quant
        from .targets.onnx import MAX_OPSET, MIN_OPSET

        _check_range("--opset", opset, MIN_OPSET, MAX_OPSET)  # options first: nothing is loaded for a bad one
        _check_jobs(check_jobs)
        _check_int4_options(quant, int4_block_size, int4_embedding)
        block = int4_block_size or DEFAULT_INT4_BLOCK_SIZE
        res = export_onnx(checkpoint, out, force=force, tokenizer=tokenizer, quant=parse_quant(quant),
                          quant_options=QuantOptions(block, int4_embedding), simplify=simplify,
                          check=check, prefill=prefill, opset=opset, progress=_progress(quiet), embedding=embedding,
                          check_jobs=check_jobs)
        for r in res.reports:
            typer.echo(format_any(r))
        typer.echo(f"wrote {res.out}/ ({', '.join(f['file'] for f in res.manifest['files'])}, manifest.json)")
    except RwkvExportError as e:
        _fail(e)


@app.command()
def quantize(
    folder: Path = typer.Argument(..., help="An export folder with an fp32 model."),
    quant: str = typer.Option(..., "--quant", help="Variants to add, comma-separated: fp16,int8,int4."),
    checkpoint: Optional[str] = typer.Option(None, help="The source checkpoint; default: the one the manifest records."),
    int4_block_size: Optional[int] = typer.Option(None, help=INT4_BLOCK_HELP, show_default=str(DEFAULT_INT4_BLOCK_SIZE)),
    int4_embedding: bool = typer.Option(False, "--int4-embedding", help="Quantize the embedding table to int4 too."),
    force: bool = typer.Option(False, "--force", help="Replace variants the folder already has."),
    check: bool = typer.Option(True, "--check/--no-check"),
    quiet: bool = typer.Option(False, "-q", "--quiet"),
    check_jobs: Optional[int] = _check_jobs_option(),
):
    """Add quantized variants to an existing export FOLDER (checked before they are added)."""
    try:
        from .check import format_any
        from .export import QuantOptions, add_variants, parse_quant

        _check_int4_options(quant, int4_block_size, int4_embedding)
        _check_jobs(check_jobs)
        variants = parse_quant(quant)
        if not variants:
            raise RwkvExportError("--quant names no variant; choose from fp16, int8, int4")
        block = int4_block_size or DEFAULT_INT4_BLOCK_SIZE
        res = add_variants(folder, variants, checkpoint=checkpoint, force=force, check=check,
                           quant_options=QuantOptions(block, int4_embedding), progress=_progress(quiet),
                           check_jobs=check_jobs)
        for r in res.reports:
            typer.echo(format_any(r))
        graphs = [f"{g['variant']} {g['kind']}" for g in res.manifest["graphs"]]
        typer.echo(f"updated {res.out}/ (graphs: {', '.join(graphs)})")
    except RwkvExportError as e:
        _fail(e)


def _edge_command(target: str, checkpoint, out, force, tokenizer, quant, check, quiet, prefill: bool = False,
                  embedding: bool = False, check_jobs: int | None = None):
    try:
        from .check import format_any
        from .export import export_target, parse_quant

        _check_jobs(check_jobs)
        res = export_target(target, checkpoint, out, force=force, tokenizer=tokenizer, quant=parse_quant(quant, target),
                            check=check, prefill=prefill, progress=_progress(quiet), embedding=embedding,
                            check_jobs=check_jobs)
        for r in res.reports:
            typer.echo(format_any(r))
        typer.echo(f"wrote {res.out}/ ({len(res.manifest['files'])} files, manifest.json)")
    except RwkvExportError as e:
        _fail(e)


@app.command()
def tflite(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (model*.tflite, manifest.json, tokenizer)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json to ship instead of the bundled one, or 'bytes'."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Extra variants, comma-separated: fp16,int8,int4."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the gates in the LiteRT interpreter first."),
    prefill: bool = typer.Option(True, "--prefill/--no-prefill",
                                 help="Also write each variant's prompt graph: prefill*.tflite beside model*.tflite, "
                                      "a `prefill` signature for chunks of 16 tokens."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
    embedding: bool = typer.Option(False, "--embedding", help=EMBEDDING_HELP),
    check_jobs: Optional[int] = _check_jobs_option(),
):
    """Export CHECKPOINT to TFLite (LiteRT): per variant a step file (`step` signature) and a prompt-graph file
    (`prefill` signature). Extra: [tflite]."""
    _edge_command("tflite", checkpoint, out, force, tokenizer, quant, check, quiet, prefill, embedding, check_jobs)


@app.command()
def tfjs(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (tfjs*/model.json + shards, manifest.json)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json to ship instead of the bundled one, or 'bytes'."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Extra variants, comma-separated: fp16,uint8."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the gates in Node with @tensorflow/tfjs first."),
    prefill: bool = typer.Option(True, "--prefill/--no-prefill",
                                 help="Also put the prompt graph (1..max_chunk tokens per call) in each model.json, "
                                      "sharing the step graph's weights (not with --embedding)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
    embedding: bool = typer.Option(False, "--embedding", help=EMBEDDING_HELP),
    check_jobs: Optional[int] = _check_jobs_option(),
):
    """Export CHECKPOINT to a TF.js graph model (model.json + weight shards) per variant, holding the step and the
    prompt graph. Checking needs Node."""
    _edge_command("tfjs", checkpoint, out, force, tokenizer, quant, check, quiet, prefill, embedding, check_jobs)


@app.command()
def check(
    folder: Path = typer.Argument(..., help="An export folder (with manifest.json)."),
    checkpoint: Optional[str] = typer.Option(None, help="Reference checkpoint; default: the one the manifest records."),
    update_manifest: bool = typer.Option(False, "--update-manifest", help="Store the new parity results."),
    quiet: bool = typer.Option(False, "-q", "--quiet"),
    check_jobs: Optional[int] = _check_jobs_option(),
):
    """Re-run the gates of every graph in FOLDER against runtime_ref (parity; quality on the eval text for quantized
    variants); exit nonzero past a tolerance or gate."""
    try:
        from .check import check_folder, format_any, gate_all

        _check_jobs(check_jobs)
        reports = check_folder(folder, checkpoint, progress=_progress(quiet), update_manifest=update_manifest,
                               raise_on_fail=False, processes=check_jobs)
        for r in reports:
            typer.echo(format_any(r))
        gate_all(reports)
    except RwkvExportError as e:
        _fail(e)


@app.command()
def generate(
    model: str = typer.Argument(..., help="An export folder, or a checkpoint / builtin:NAME (runs the reference)."),
    prompt: str = typer.Option(..., "-p", "--prompt"),
    max_tokens: int = typer.Option(100, "-n", "--max-tokens", min=0),
    temperature: float = typer.Option(1.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.85, help="Nucleus sampling: keep the most likely tokens up to this probability mass, "
                                "in (0, 1]."),
    min_p_ratio: float = typer.Option(0.02, min=0.0, help="Drop tokens with p < ratio * p_max^power (0 = off)."),
    min_p_power: float = typer.Option(2.0, min=0.0),
    seed: int = typer.Option(0),
    variant: Optional[str] = typer.Option(None, help="Graph variant in the folder (fp32, ...); default: the first."),
    tokenizer: Optional[str] = typer.Option(
        None, help="Override the tokenizer (a tokenizer.json, an RWKV World vocab .txt, 'rwkv-world' or 'bytes')."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No statistics line."),
):
    """Stream text generated from PROMPT."""
    try:
        from .generate import check_prompt
        from .generate import generate as run_generate
        from .generate import open_model

        _check_range("--top-p", top_p, 0, 1, open_low=True)
        check_prompt(prompt)
        runner, tok = open_model(model, variant=variant, tokenizer=tokenizer, progress=_progress(quiet))
        if hasattr(sys.stdout, "reconfigure"):  # text the terminal's encoding cannot show prints as '?', not a crash
            sys.stdout.reconfigure(errors="replace")

        def emit(piece: str):
            sys.stdout.write(piece)
            sys.stdout.flush()

        emit(prompt)
        stats = run_generate(runner, tok, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             min_p_ratio=min_p_ratio, min_p_power=min_p_power, seed=seed, on_text=emit)
        sys.stdout.write("\n")
        if not quiet:
            typer.echo(
                f"[prompt {stats.prompt_tokens} tokens in {stats.prompt_seconds:.2f} s ({stats.prompt_mode}); generated "
                f"{stats.generated_tokens} tokens at {stats.tokens_per_second:.1f} tok/s]",
                err=True,
            )
    except RwkvExportError as e:
        _fail(e)


@app.command()
def serve(
    folder: Path = typer.Argument(..., help="An export folder (with manifest.json) to run in the browser demo."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port (0 = any free port)."),
):
    """Serve the web demo and FOLDER's model on HOST:PORT with the headers multi-threaded wasm needs."""
    try:
        from .serve import serve as run_serve

        _check_range("--port", port, 0, 65535)
        run_serve(folder, host=host, port=port)
    except RwkvExportError as e:
        _fail(e)


@app.command()
def bundle(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle folder."),
    runtime: str = typer.Option("ort-mobile", help="App runtime: ort-mobile (ONNX Runtime Mobile, .ort) or tflite."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Extra variants, comma-separated (e.g. int8,int4)."),
    part_mb: Optional[int] = typer.Option(None, help="Split model files into parts of at most this many MiB."),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json to ship instead of the bundled one, or 'bytes'."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    check: bool = typer.Option(True, "--check/--no-check"),
    quiet: bool = typer.Option(False, "-q", "--quiet"),
    embedding: bool = typer.Option(False, "--embedding", help=EMBEDDING_HELP),
):
    """Everything a phone app needs in one folder: model, tokenizer, manifest and a generated INTEGRATION.md."""
    try:
        from .bundle import make_bundle
        from .export import parse_quant

        m = make_bundle(checkpoint, out, runtime=runtime, quant=parse_quant(quant), force=force,
                        part_bytes=part_mb * 1024 * 1024 if part_mb is not None else None,
                        tokenizer=tokenizer, check=check, progress=_progress(quiet), embedding=embedding)
        typer.echo(f"wrote {out}/ ({', '.join(f['file'] for f in m['files'])}, manifest.json)")
    except RwkvExportError as e:
        _fail(e)


@app.command()
def embed(
    folder: Path = typer.Argument(..., help="An export folder made with --embedding."),
    texts: list[str] = typer.Argument(None, help="Texts to embed (one vector each)."),
    pool: str = typer.Option("mean", "--pool", help="last (the last token's hidden state), mean (over the tokens) "
                             "or state (the RNN state after the text, flattened)."),
    similarity: bool = typer.Option(False, "--similarity", help="Print the cosine similarity of the two TEXTS."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the vectors to this .npy file ([texts, dim])."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    graph: Optional[str] = typer.Option(None, "--graph", help="step or prefill; default: prefill if the folder has it."),
    variant: str = typer.Option("fp32", help="Graph variant in the folder."),
):
    """Print one embedding vector per text (or --similarity A B: their cosine similarity)."""
    try:
        from .embed import cosine, embed_texts, format_vector, save_npy

        texts = texts or []
        if similarity and len(texts) != 2:
            raise RwkvExportError(f"--similarity takes exactly two texts, got {len(texts)}")
        kinds = {None: None, "step": "step", "prefill": "sequence"}
        if graph not in kinds:
            raise RwkvExportError(f"unknown --graph '{graph}'; choose from step, prefill")
        vectors = embed_texts(folder, texts, pool=pool, kind=kinds[graph], variant=variant)
        if out is not None:
            save_npy(out, vectors, force=force)
        if similarity:
            typer.echo(f"{cosine(vectors[0], vectors[1]):.6f}")
        elif out is None:
            for v in vectors:
                typer.echo(format_vector(v))
        else:
            typer.echo(f"wrote {out} ({vectors.shape[0]} x {vectors.shape[1]} float32, --pool {pool})")
    except RwkvExportError as e:
        _fail(e)


@app.command()
def builtins():
    """List the built-in models (made on the spot, no download)."""
    from .sources import BUILTINS

    for name, (_, _, _, desc) in BUILTINS.items():
        typer.echo(f"builtin:{name:16s} {desc}")


def main():
    app()


if __name__ == "__main__":
    main()
