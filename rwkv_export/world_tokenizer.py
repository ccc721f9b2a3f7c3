"""The RWKV World tokenizer (RWKV-5/6/7 World models): 65,536 ids, greedy longest match over the UTF-8 bytes.

The vocabulary file (`rwkv_vocab_v20230424.txt`) has one token a line: `ID LITERAL LENGTH`, where LITERAL is a
Python `str` or `bytes` literal (the token's bytes are the UTF-8 of a `str`, or the `bytes` themselves) and LENGTH
is that byte count. Literals are parsed with `ast.literal_eval` (never `eval`). Id 0 is the end-of-text token and has
no bytes; ids the file does not list (65530..65535) have none either.

Encoding walks the text's UTF-8 bytes left to right and takes, at each position, the longest token that is a prefix
of the rest (every single byte is a token, so there is always one). Instead of a byte trie (hundreds of thousands of
nodes), tokens are found by their first two bytes: each two-byte prefix lists the lengths of the tokens that start
with it, longest first, and the first length whose slice is a token wins; else the single byte.
"""

from __future__ import annotations

import ast

from .errors import TokenizerError

WORLD_VOCAB = 65536  # ids 0..65535 (the model's vocab); the file lists 1..65529
WORLD_EOS_ID = 0
EOS_TEXT = "<|endoftext|>"


def _literal(lit: str) -> object:
    """A Python literal's value: ast.literal_eval, with a fast path for the common quoted text without escapes (what
    the literal means then is plain: the characters between the quotes)."""
    if "\\" not in lit and len(lit) >= 2 and lit[-1] in "'\"":
        q = lit[-1]
        if lit[0] == q and q not in lit[1:-1]:
            return lit[1:-1]
        if lit[:2] == "b" + q and q not in lit[2:-1] and lit[2:-1].isascii():
            return lit[2:-1].encode("ascii")
    return ast.literal_eval(lit)


def parse_vocab(text: str, where: str = "vocab") -> dict[int, bytes]:
    """The vocab file's text -> {id: token bytes}. A malformed line is a one-line TokenizerError."""
    tokens: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    lines = text.split("\n")  # not splitlines(): it also splits at \x0b, \x1c, \x85, \u2028 ...
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if line.endswith("\r"):  # the file as shipped has CRLF line ends
            line = line[:-1]

        def bad(why: str, n=n, line=line) -> TokenizerError:
            return TokenizerError(f"{where} line {n}: {why}: {line[:60]!r}")

        first, last = line.find(" "), line.rfind(" ")
        if first <= 0 or last <= first + 1:
            raise bad("expected 'ID LITERAL LENGTH'")
        sid, lit, slen = line[:first], line[first + 1 : last], line[last + 1 :]
        if not (sid.isascii() and sid.isdigit() and slen.isascii() and slen.isdigit()):
            raise bad("the id and length must be decimal integers")
        tid, length = int(sid), int(slen)
        try:
            value = _literal(lit)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise bad("not a Python string or bytes literal") from None
        if isinstance(value, str):
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("the string is not valid Unicode (a lone surrogate)") from None
        elif not isinstance(value, bytes):
            raise bad(f"a {type(value).__name__}, not a string or bytes literal")
        if len(value) != length or length == 0:
            raise bad(f"the token has {len(value)} bytes, the line says {length}")
        if not 0 < tid < WORLD_VOCAB:
            raise bad(f"id {tid} is outside 1..{WORLD_VOCAB - 1} (id 0 is end-of-text)")
        if tid in tokens:
            raise bad(f"id {tid} is listed twice")
        if value in seen:
            raise bad(f"the same bytes as id {seen[value]}")
        tokens[tid] = value
        seen[value] = tid
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise TokenizerError(f"{where}: no token for the single byte 0x{missing[0]:02x}; "
                             "some text could not be encoded")
    return tokens


class WorldTokenizer:
    """RWKV World tokenizer: encode = greedy longest byte match, decode = the tokens' bytes concatenated."""

    vocab_size = WORLD_VOCAB
    eos_token_id = WORLD_EOS_ID

    def __init__(self, tokens: dict[int, bytes]):
        self._bytes: list[bytes | None] = [None] * WORLD_VOCAB
        self._ids: dict[bytes, int] = {}
        lens: dict[int, set[int]] = {}
        for tid, b in tokens.items():
            self._bytes[tid] = b
            self._ids[b] = tid
            if len(b) >= 2:
                lens.setdefault((b[0] << 8) | b[1], set()).add(len(b))
        self._single = [self._ids[bytes([b])] for b in range(256)]
        self._lens = {k: tuple(sorted(v, reverse=True)) for k, v in lens.items()}

    @classmethod
    def from_text(cls, text: str, where: str = "vocab") -> "WorldTokenizer":
        return cls(parse_vocab(text, where))

    def encode_bytes(self, src: bytes) -> list[int]:
        ids, lens, single = self._ids, self._lens, self._single
        out: list[int] = []
        i, n = 0, len(src)
        while i < n:
            step, tid = 1, single[src[i]]
            if i + 1 < n:
                room = n - i
                for length in lens.get((src[i] << 8) | src[i + 1], ()):
                    if length <= room:
                        t = ids.get(src[i : i + length])
                        if t is not None:
                            step, tid = length, t
                            break
            out.append(tid)
            i += step
        return out

    def encode(self, text: str) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD each, as a browser's TextEncoder does (web_demo agrees)
            data = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text).encode("utf-8")
        return self.encode_bytes(data)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of one id; None for end-of-text (0), ids the vocab does not list, and ids out of range."""
        i = int(token_id)
        return self._bytes[i] if 0 <= i < WORLD_VOCAB else None

    def decode_bytes(self, ids) -> bytes:
        return b"".join(b for b in map(self.token_bytes, ids) if b is not None)

    def decode(self, ids) -> str:
        """Ids without bytes are dropped; invalid or incomplete UTF-8 becomes U+FFFD (StreamDecoder relies on it)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token == EOS_TEXT:
            return WORLD_EOS_ID
        return self._ids.get(token.encode("utf-8", errors="surrogatepass"))
