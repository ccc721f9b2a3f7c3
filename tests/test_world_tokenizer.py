"""The RWKV World tokenizer ("rwkv-world", RWKV-5/6/7 World models): Python and the web demo's JS, id for id.

- Python (rwkv_export.world_tokenizer) against the `rwkv` pip package's TRIE_TOKENIZER (the outside oracle, reading
  the pip package's own copy of the vocab) on a multilingual corpus, random text and random bytes, and on every
  token of the vocabulary;
- JS (web_demo/tokenizer.js through tests/js/tokenizer_cli.mjs under Node) against Python on the same corpus:
  encode, decode, streaming decode, decode(encode(s)) == s, and the Python-literal parser on every escape form;
- the vocab's sha256 check (Python and JS) refuses a damaged copy with one line; malformed vocab lines are refused;
- the resolve rules (vocab 65536 -> rwkv-world; a tokenizer with more ids than the model's vocab refused);
- an exported vocab-65536 folder: manifest entry, the vocab file copied, check/generate/bundle read it, and the web
  demo in headless Chromium selects the World tokenizer from the manifest and encodes like Python.

Needs Node >= 20, `npm ci --prefix web_demo`, Playwright (Python package) and /usr/bin/chromium; a missing one is a
failure, never a skip.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from rwkv_export import tokenizer as tk
from rwkv_export.errors import TokenizerError
from rwkv_export.tokenizer import (
    StreamDecoder, TokenizerSpec, WORLD_FILE, WORLD_SHA256, load_tokenizer, resolve_tokenizer, sha256_file,
    spec_from_manifest,
)
from rwkv_export.world_tokenizer import WorldTokenizer, parse_vocab

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web_demo"
CLI = ROOT / "tests" / "js" / "tokenizer_cli.mjs"
EVAL_TEXT = ROOT / "rwkv_export" / "data" / "tiny-pydoc-eval.txt"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETUP_HINT = "install Node >= 20 and run `npm ci --prefix web_demo`"
WORLD_TINY = dict(n_layer=1, n_embd=16, ffn_dim=64, vocab_size=65536)  # the smallest model with the World vocab

CORPUS: list[str] = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the_quick-brown.fox",
    " leading space", "trailing spaces   ", "   ", " ", "\n", "\n\n\n\n", "\r\n\r\n",
    "a  b   c    d     e" + " " * 30 + "f" + " " * 200 + "g",
    " " * 128, " " * 129, " " * 1000, "-" * 81, "#" * 160 + "=" * 7,
    "\tone tab\t\ttwo tabs\t\t\t", "\t" * 40,
    "para one\n\n\npara two\n", "windows\r\nline\r\nendings\r\n", " \n \n\n  \t \r\n",
    # Chinese, Japanese, Korean
    "中文字符和日本語のテキスト、한국어 텍스트。", "我们今天去北京天安门广场看升旗仪式，然后吃烤鸭。",
    "人工智能（AI）是计算机科学的一个分支。", "東京都渋谷区で、カタカナとひらがなを混ぜて書きます。ｶﾀｶﾅ半角",
    "대한민국의 수도는 서울입니다. 안녕하세요!",
    # Russian, Arabic, Hebrew, Greek, Hindi, Thai, Vietnamese, Turkish
    "Русский текст: Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "العربية: مرحبا بالعالم ١٢٣ — اللغة العربية جميلة.", "עברית שלום עולם", "Ελληνικά: Καλημέρα κόσμε",
    "हिन्दी में लिखा हुआ पाठ", "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "Tiếng Việt có dấu: Xin chào thế giới",
    "İstanbul'da ıslak ğ ş ç ö ü",
    # accents, combining marks (World does no normalization: decomposed stays decomposed)
    "Café résumé naïve Ångström Łódź œuvre façade", "e\u0301 vs \u00e9, A\u030a, n\u0303",
    "a\u0300\u0301\u0302\u0303\u0304 stacked combining marks",
    # emoji
    "🙂😀🎉 emoji", "family 👨\u200d👩\u200d👧\u200d👦 and 🏳\ufe0f\u200d🌈 ZWJ",
    "👍🏽 skin tone, flags 🇺🇸🇯🇵🇩🇪 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f, keycap 1\ufe0f\u20e3",
    "🙂" * 50,
    # code
    'def fib(n):\n    """Fibonacci."""\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n'
    "print([fib(i) for i in range(10)])\n",
    'class A:\n\tdef f(self):\n\t\treturn {"k": [1, 2.5, -3e10, None]}\n\t\t\t# deep\n',
    "for (let i = 0; i < n; i++) { x += a[i] * b[i]; } // C-like\n#include <stdio.h>\nint main(void) { return 0; }\n",
    '{"name": "rwkv", "vocab_size": 65536, "layers": [1, 2, 3], "ok": true, "nested": {"a": null}}',
    "<div class=\"x\">&amp; &lt;tag&gt;</div>\n<?php echo $x; ?>", "SELECT * FROM t WHERE a = 'b' AND c <> 3;",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$ \\\\ \\$ \\n \\t", "C:\\Users\\name\\file.txt",
    # numbers and punctuation
    "0 1 12 123 1234 12345 123456789 3.14159 -42 1e-9 0x1F 1,000,000 ½ ² ⅔ ١٢٣٤",
    "it's don't we're I've I'm you'll he'd 'quoted' \"double\" `back`",
    "!!! ??? ... --- *** ___ ~~~ ^^^ ||| ''' \"\"\" ```python\n```",
    # mixed scripts in one run
    "RWKV是一种RNN模型, которая работает как GPT 🤖 と言われています 그리고 مرحبا!",
    "abc中def日本ghi한국jkl🙂mno",
    # control characters, rare code points (each a byte sequence the vocab may only have as single bytes)
    "vt\x0bff\x0cfs\x1cus\x1f nul\x00 del\x7f", "\x00" * 5, "c1 \x80\x85\x9f end",
    "nbsp\u00a0here, ideographic\u3000space, thin\u2009space, line\u2028sep, zwsp\u200bx, bom\ufeff",
    "\ufeffBOM at start", "\ufffd replacement, \uffff nonchar, \U0010ffff last, \ue000 private, \U00020000 ext-B",
    "<|endoftext|> is just text here",
]

FUZZ_POOL = list(
    "ab Zé\u0301ü中文字日本語のテキスト한국어Русскийالعربية🙂👨\u200d👩\u200d👧🇺🇸 \t\n\r\u00a0\u0085\ufeff\u2028\u3000"
    "\u200b'sterd0123456789١٢٣½!?.,;:()[]{}\"<|>\\$\x00\x7f\x0b\x1c\u0300\ud7ff\U0001f3fb"
) + ["    ", "\t\t", "\r\n", " \n", "  ", "the", " the", "ing", "的", "です", "--", "##", "\n\n"]


def _fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _all_texts() -> list[str]:
    return CORPUS + [EVAL_TEXT.read_text(encoding="utf-8")] + _fuzz(800, 1234)


def _oracle_vocab() -> Path:
    import rwkv

    p = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    assert p.is_file(), f"{p} is missing: the `rwkv` pip package is the oracle"
    return p


@pytest.fixture(scope="module")
def oracle():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(_oracle_vocab()))


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return load_tokenizer(resolve_tokenizer(65536))


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node not found on PATH: {SETUP_HINT}")
    if not (WEB / "node_modules").is_dir():
        pytest.fail(f"{WEB / 'node_modules'} is missing: run `npm ci --prefix web_demo`")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"node {version} is too old: {SETUP_HINT}")
    return node


def _cli(payload: dict) -> tuple[int, dict]:
    proc = subprocess.run([_node(), str(CLI)], input=json.dumps(payload), capture_output=True, text=True,
                          encoding="utf-8", cwd=ROOT, timeout=300)
    if proc.returncode not in (0, 3):
        pytest.fail(f"{CLI.name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.returncode, json.loads(proc.stdout)


def _run_js(spec: dict, texts=(), id_seqs=(), tokens=()) -> dict:
    rc, out = _cli({"spec": spec, "texts": list(texts), "id_seqs": list(id_seqs), "tokens": list(tokens)})
    assert rc == 0, out
    return out


def _check_stream(ids, chunks, flush, full, label):
    assert len(chunks) == len(ids), label
    assert "".join(chunks) + flush == full, f"streamed text != full decode for {label}"
    if "\ufffd" not in full:
        assert flush == "", label
        assert not any("\ufffd" in c for c in chunks), f"U+FFFD printed mid-stream for {label}"


# ---- Python against the pip package ---------------------------------------------------------------------------


def test_vocab_is_the_pip_packages(world, oracle):
    """The shipped copy is byte-identical to the pip package's, and parses to the same 65,529 tokens."""
    assert WORLD_FILE.read_bytes() == _oracle_vocab().read_bytes()
    assert sha256_file(WORLD_FILE) == WORLD_SHA256
    assert len(oracle.idx2token) == 65529 and min(oracle.idx2token) == 1
    for i in range(65536):
        assert world.token_bytes(i) == oracle.idx2token.get(i), i
    assert world.token_bytes(0) is None and world.token_bytes(65530) is None and world.token_bytes(-1) is None
    assert world.vocab_size == 65536 and world.eos_token_id == 0


def test_python_encode_matches_pip_oracle(world, oracle):
    texts = _all_texts()
    n_tokens = 0
    for text in texts:
        want = oracle.encode(text)
        got = world.encode(text)
        assert got == want, f"encode mismatch for {text!r:.120}"
        assert world.decode_bytes(got) == oracle.decodeBytes(want) == text.encode("utf-8")
        assert world.decode(got) == text
        n_tokens += len(got)
    assert n_tokens > 10_000
    # The corpus does reach the long tokens (the vocab's longest is 128 bytes) and multi-byte ones.
    used = {i for t in texts for i in world.encode(t)}
    assert any(len(world.token_bytes(i)) >= 64 for i in used)
    assert any(len(world.token_bytes(i).decode("utf-8", "replace")) < len(world.token_bytes(i)) for i in used)


def test_python_encode_bytes_matches_pip_oracle(world, oracle):
    """Arbitrary bytes (invalid UTF-8 included): the greedy match is over bytes, not characters."""
    rng = random.Random(7)
    pool = [bytes([b]) for b in range(256)] + [t for t in oracle.idx2token.values() if len(t) > 1][::97]
    for _ in range(3000):
        src = b"".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        assert world.encode_bytes(src) == oracle.encodeBytes(src), src


def test_every_token_encodes_to_itself(world):
    """Each token's bytes are a token, so the longest match is the whole: encode(token) == [id]."""
    for i in range(1, 65530):
        b = world.token_bytes(i)
        assert world.encode_bytes(b) == [i], (i, b)


def test_python_stream_decoder_holds_back_split_characters(world):
    text = "中文字符 🙂👨\u200d👩\u200d👧 Русский"
    ids = [tid for b in text.encode("utf-8") for tid in world.encode_bytes(bytes([b]))]  # byte by byte
    dec = StreamDecoder(world)
    chunks = [dec.push(i) for i in ids]
    assert "".join(chunks) + dec.flush() == text
    assert not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c == "") > 10  # every non-final byte of a character was held back
    dec = StreamDecoder(world)
    assert [dec.push(i) for i in [0, *world.encode("ok"), 0, 65535]] == ["", "ok", "", ""] and dec.flush() == ""
    dec = StreamDecoder(world)
    assert dec.push(world.encode_bytes(b"\xe4")[0]) == "" and dec.flush() == "\ufffd"  # never completed


def test_lone_surrogates_encode_as_replacement_char(world):
    assert world.encode("a\ud800b") == world.encode("a\ufffdb")


# ---- the vocab file: damage and malformed lines ------------------------------------------------------------------


def _damaged_copies(tmp_path: Path) -> dict[str, Path]:
    data = WORLD_FILE.read_bytes()
    i = data.index(b"' 6\r\n") - 2  # inside the first 6-byte token's literal: still a well-formed file
    flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
    out = {}
    for name, content in {"flipped": flipped, "truncated": data[: len(data) // 2], "empty": b"",
                          "extra-line": data + b"65530 'zzzzzzzzzzzz' 12\r\n"}.items():
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / WORLD_FILE.name).write_bytes(content)
        out[name] = d
    return out


def test_damaged_vocab_refused(tmp_path, monkeypatch):
    entry = TokenizerSpec("rwkv-world").manifest_entry(WORLD_FILE.name)
    for name, folder in _damaged_copies(tmp_path).items():
        spec = spec_from_manifest(folder, entry)
        assert spec == TokenizerSpec("rwkv-world", folder / WORLD_FILE.name)
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(spec)
        msg = str(e.value)
        assert "damaged" in msg and "sha256" in msg and "\n" not in msg, (name, msg)
    # the bundled copy, damaged: refused when resolving the default for a World model too
    monkeypatch.setattr(tk, "WORLD_FILE", _damaged_copies(tmp_path / "b")["flipped"] / WORLD_FILE.name)
    with pytest.raises(TokenizerError, match="damaged"):
        resolve_tokenizer(65536)
    with pytest.raises(TokenizerError, match="damaged"):
        resolve_tokenizer(65536, "rwkv-world")
    # the same file with LF line ends (a checkout that normalizes line endings) is the same vocabulary: accepted
    lf = tmp_path / "lf"
    lf.mkdir()
    (lf / WORLD_FILE.name).write_bytes(WORLD_FILE.read_bytes().replace(b"\r\n", b"\n"))
    lf_tok = load_tokenizer(spec_from_manifest(lf, entry))
    text = _all_texts()[40]
    assert lf_tok.encode(text) == load_tokenizer(resolve_tokenizer(65536, str(WORLD_FILE))).encode(text)
    # a missing file is one line too
    with pytest.raises(TokenizerError, match="cannot read") as e:
        load_tokenizer(TokenizerSpec("rwkv-world", tmp_path / "nope.txt"))
    assert "\n" not in str(e.value)


def test_js_refuses_damaged_vocab(tmp_path):
    for name, folder in _damaged_copies(tmp_path).items():
        rc, out = _cli({"spec": {"kind": "rwkv-world", "vocab_path": str(folder / WORLD_FILE.name)},
                        "texts": ["x"], "id_seqs": []})
        assert rc == 3 and "damaged" in out["load_error"] and "\n" not in out["load_error"], (name, out)
    out = _run_js({"kind": "rwkv-world", "vocab_path": str(WORLD_FILE)}, ["x"])
    assert out["verified"] is True  # Node has crypto.subtle: the check ran and passed
    lf = tmp_path / "lf.txt"
    lf.write_bytes(WORLD_FILE.read_bytes().replace(b"\r\n", b"\n"))
    text = CORPUS[20]
    out = _run_js({"kind": "rwkv-world", "vocab_path": str(lf)}, [text])
    assert out["verified"] is True and out["encode"] == [load_tokenizer(resolve_tokenizer(65536)).encode(text)]


def _byte_lines() -> list[str]:
    return [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]


# Literals covering every escape form the JS parser reads (the real vocab uses \x \u \t \n \r \\ \' only); each is
# a distinct token of at least two bytes.
LITERAL_CASES = [
    r"'\x85'", r"b'\x85\xff'", r"'\u3000'", r"'\U0001F600'", r"'\t\n\r'", "\"it's\"", r"'\'q'", "'\"q'", r"'\0z'",
    r"'\101\1010'", r"b'\101\x42'", "'é中🙂'", r"b'\\\\'", r"'\a\b\f\v'", r"b'\u1234'", r"'\\$'", r"'\%'",
    r"'x\\'", r"b'\"r'", "'  '", r"'\x00\x7f'", "B'caps'", r"'\ud7ff\ue000'", r"'\777'", r"b'\x41\x42\x43\x44'",
    "'a\"b'", "\"a'b\"",
]


def test_js_literal_parser_matches_python(tmp_path):
    import ast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "invalid escape sequence '\%'": Python keeps the backslash, so must JS
        lit_bytes = [v.encode("utf-8") if isinstance(v, str) else v for v in map(ast.literal_eval, LITERAL_CASES)]
        lines = _byte_lines() + [f"{300 + k} {lit} {len(b)}"
                                 for k, (lit, b) in enumerate(zip(LITERAL_CASES, lit_bytes))]
        text = "\r\n".join(lines) + "\r\n"
        tokens = parse_vocab(text, "x")
    assert len(tokens) == 256 + len(LITERAL_CASES) and all(len(b) >= 2 for b in lit_bytes)
    assert lit_bytes[LITERAL_CASES.index(r"'\%'")] == b"\\%"
    assert lit_bytes[LITERAL_CASES.index(r"b'\u1234'")] == b"\\u1234"
    py = WorldTokenizer(tokens)
    path = tmp_path / "v.txt"
    path.write_text(text, encoding="utf-8", newline="")
    ids = [[300 + k] for k in range(len(LITERAL_CASES))] + [[300 + k for k in range(len(LITERAL_CASES))]]
    whole = {b.decode("utf-8"): 300 + k for k, b in enumerate(lit_bytes) if _utf8(b)}
    texts = list(whole) + ["".join(whole), "a\\$b\\x\\ 🙂é中\t\n\r"]
    out = _run_js({"kind": "rwkv-world", "vocab_path": str(path), "sha256": None}, texts, ids)
    assert out["verified"] is False  # sha256: null skips the check (a test vocab)
    for i, seq in enumerate(ids):
        assert out["decode"][i] == py.decode(seq), (LITERAL_CASES[i] if i < len(LITERAL_CASES) else seq)
    for t, got in zip(texts, out["encode"], strict=True):
        assert got == py.encode(t), t
        if t in whole:
            assert got == [whole[t]], t  # the JS parser read the literal to exactly Python's bytes


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


BAD_LINES = {
    "1 __import__('pathlib').Path({marker!r}).touch() 1": "not a Python string or bytes literal",
    "1 'ab' 3": "the token has 2 bytes, the line says 3",
    "1 '' 0": "the token has 0 bytes",
    "0 'zz' 2": "outside 1..65535",
    "65536 'zz' 2": "outside 1..65535",
    "x 'zz' 2": "decimal integers",
    "1 'zz'": "expected 'ID LITERAL LENGTH'",
    "1 3 1": "not a string or bytes literal",
    "300 'a' 1": "the same bytes as id 98",
    "2 'zz' 2": "listed twice",
    "300 '\\ud800' 3": "lone surrogate",
    "300 b'\u00e9' 2": "not a Python string or bytes literal",
}


@pytest.mark.parametrize("line", list(BAD_LINES))
def test_malformed_vocab_line_refused(tmp_path, line):
    marker = tmp_path / "executed"
    text = "\n".join(_byte_lines() + [line.replace("{marker!r}", repr(str(marker)))]) + "\n"
    with pytest.raises(TokenizerError, match="line 257") as e:
        parse_vocab(text, "v.txt")
    assert BAD_LINES[line] in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "v.txt"
    path.write_text(text, encoding="utf-8")
    rc, out = _cli({"spec": {"kind": "rwkv-world", "vocab_path": str(path), "sha256": None},
                    "texts": [], "id_seqs": []})
    assert rc == 3 and "line 257" in out["load_error"], out
    assert not marker.exists()  # the literal was parsed, never evaluated


def test_vocab_without_every_byte_refused():
    with pytest.raises(TokenizerError, match="single byte 0xff"):
        parse_vocab("\n".join(_byte_lines()[:255]) + "\n")


# ---- JS against Python ------------------------------------------------------------------------------------------


def test_js_matches_python(world):
    texts = _all_texts() + _fuzz(200, 99) + ["a\ud800b", "\udfff"]  # lone surrogates: U+FFFD in both
    # every token whose bytes are UTF-8 text, as a text of its own: JS must find it whole
    token_texts = {i: world.token_bytes(i).decode("utf-8") for i in range(1, 65530) if _utf8(world.token_bytes(i))}
    all_texts = texts + list(token_texts.values())
    ref = [world.encode(t) for t in all_texts]
    rng = random.Random(5)
    random_seqs = [[rng.randrange(65536) for _ in range(rng.randint(1, 16))] for _ in range(400)]
    byte_ids = {b: world.encode_bytes(bytes([b]))[0] for b in range(256)}
    split = [byte_ids[b] for b in "中🙂é".encode("utf-8")]  # multi-byte characters one byte a token
    random_seqs += [[0], [0, 65529, 65530, 65535], split, split[:-1], [byte_ids[0xFF], byte_ids[0x41]], [-1, 70000]]
    id_seqs = ref[: len(texts)] + random_seqs
    spec = {"kind": "rwkv-world", "vocab_path": str(WORLD_FILE), "vocab_size": 65536}
    out = _run_js(spec, all_texts, id_seqs, tokens=["<|endoftext|>", " the", "的", "not a single token at all"])
    assert (out["kind"], out["vocab_size"]) == ("rwkv-world", 65536)

    for text, want, got in zip(all_texts, ref, out["encode"], strict=True):
        assert got == want, f"encode mismatch for {text!r:.120}"
    for i, t in enumerate(token_texts):
        assert out["encode"][len(texts) + i] == [t]
    assert len(token_texts) > 60_000

    held_back = 0
    for i, ids in enumerate(id_seqs):
        label = f"ids {ids[:12]}" + (f" (text {texts[i]!r:.80})" if i < len(texts) else "")
        full = world.decode([j for j in ids if 0 <= j < 65536])
        assert out["decode"][i] == full, f"decode mismatch for {label}"
        assert out["decode_skip"][i] == full, label  # id 0 has no bytes either way
        if i < len(texts):
            want = texts[i] if "\ud800" not in texts[i] and "\udfff" not in texts[i] else None
            if want is not None:
                assert full == want, f"round trip failed for {label}"
        _check_stream(ids, out["stream"][i], out["stream_flush"][i], full, label)
        if "\ufffd" not in full:
            held_back += sum(1 for c in out["stream"][i] if c == "")
    assert held_back > 0, "no character split across tokens: streaming hold-back untested"
    assert out["stream"][id_seqs.index(split)] == ["", "", "中", "", "", "", "🙂", "", "é"]
    assert out["token_to_id"] == [0, world.token_to_id(" the"), world.token_to_id("的"), None]
    assert world.token_to_id(" the") is not None and world.token_to_id("的") is not None


# ---- resolve rules and the manifest entry -----------------------------------------------------------------------


def test_resolve_rules(tmp_path):
    assert resolve_tokenizer(65536) == TokenizerSpec("rwkv-world", WORLD_FILE)
    assert resolve_tokenizer(65536, "rwkv-world") == TokenizerSpec("rwkv-world", WORLD_FILE)
    assert resolve_tokenizer(70000, "rwkv-world").kind == "rwkv-world"  # a model vocab padded past 65536 is fine
    assert resolve_tokenizer(65536, str(WORLD_FILE)) == TokenizerSpec("rwkv-world", WORLD_FILE)  # a vocab .txt
    for small in (256, 50277, 65535):
        with pytest.raises(TokenizerError, match=f"tokenizer has 65536 ids but the model's vocab is {small}"):
            resolve_tokenizer(small, "rwkv-world")
    assert resolve_tokenizer(256).kind == "bytes" and resolve_tokenizer(50277).kind == "hf-tokenizers"
    with pytest.raises(TokenizerError, match="rwkv-world") as e:
        resolve_tokenizer(12345)
    assert "\n" not in str(e.value)
    # a tokenizer with far fewer ids than the vocab is another model's (issue 18): NeoX's 50277 on a World model, bytes
    # on a NeoX one; a padded vocab (a few percent more ids than the tokenizer) is fine
    for vocab, other in ((65536, str(tk.NEOX_FILE)), (50277, "bytes")):
        with pytest.raises(TokenizerError, match="not this model's tokenizer"):
            resolve_tokenizer(vocab, other)
    assert resolve_tokenizer(50304, str(tk.NEOX_FILE)).kind == "hf-tokenizers"

    spec = TokenizerSpec("rwkv-world", WORLD_FILE)
    assert spec.folder_file == "rwkv_vocab_v20230424.txt"
    assert TokenizerSpec("hf-tokenizers", tk.NEOX_FILE).folder_file == "tokenizer.json"
    assert TokenizerSpec("bytes").folder_file is None
    entry = spec.manifest_entry(spec.folder_file)
    assert {k: entry[k] for k in ("kind", "file", "vocab_size")} == {
        "kind": "rwkv-world", "file": "rwkv_vocab_v20230424.txt", "vocab_size": 65536}
    assert "greedy longest match" in entry["doc"]
    assert spec_from_manifest(tmp_path, entry) == TokenizerSpec("rwkv-world", tmp_path / "rwkv_vocab_v20230424.txt")
    assert spec_from_manifest(tmp_path, {"kind": "bytes", "vocab_size": 256}) == TokenizerSpec("bytes")
    assert spec_from_manifest(tmp_path, {"kind": "hf-tokenizers", "file": "tokenizer.json"}) == \
        TokenizerSpec("hf-tokenizers", tmp_path / "tokenizer.json")
    for bad in ({"kind": "sentencepiece", "file": "x"}, {"kind": "rwkv-world"}, {"kind": "rwkv-world", "file": "../x"},
                {"kind": "rwkv-world", "file": "/etc/passwd"}, {}):
        with pytest.raises(TokenizerError):
            spec_from_manifest(tmp_path, bad)


# ---- an exported World-vocab folder -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory) -> Path:
    from rwkv_export.export import export_onnx
    from rwkv_export.synthetic import make_checkpoint

    d = tmp_path_factory.mktemp("world")
    ckpt = make_checkpoint(d / "world_tiny.pth", "tiny", seed=3, **WORLD_TINY)
    export_onnx(str(ckpt), d / "out", check=False, prefill=False)
    return d / "out"


def test_export_folder_uses_world_tokenizer(world_folder, world):
    from rwkv_export.bundle import integration_doc
    from rwkv_export.check import eval_token_ids
    from rwkv_export.generate import generate, open_model
    from rwkv_export.manifest import read_manifest

    m = read_manifest(world_folder)
    assert m["tokenizer"] == TokenizerSpec("rwkv-world").manifest_entry("rwkv_vocab_v20230424.txt")
    assert (world_folder / "rwkv_vocab_v20230424.txt").read_bytes() == WORLD_FILE.read_bytes()
    listed = {f["file"]: f["sha256"] for f in m["files"]}
    assert listed["rwkv_vocab_v20230424.txt"] == WORLD_SHA256

    ids = eval_token_ids(world_folder, m, 500)
    assert ids == world.encode(EVAL_TEXT.read_text(encoding="utf-8"))[:500] and len(ids) == 500
    runner, tok = open_model(str(world_folder))
    assert isinstance(tok, WorldTokenizer)
    pieces: list[str] = []
    stats = generate(runner, tok, "中文 and English 🙂", max_tokens=12, temperature=0, on_text=pieces.append)
    assert stats.prompt_tokens == len(world.encode("中文 and English 🙂"))
    assert "".join(pieces) == tok.decode(stats.token_ids)
    doc = integration_doc(m)
    assert "`rwkv_vocab_v20230424.txt`, the RWKV World vocabulary" in doc and "Hugging Face" not in doc

    # the folder's own copy is what is read: damage it and check/generate refuse it
    copy = world_folder.parent / "damaged"
    shutil.copytree(world_folder, copy)
    vocab = copy / "rwkv_vocab_v20230424.txt"
    vocab.write_bytes(vocab.read_bytes().replace(b"'\\x00' 1", b"'\\x01' 1", 1))
    with pytest.raises(TokenizerError, match="damaged"):
        eval_token_ids(copy, m, 10)


def test_web_demo_selects_world_tokenizer(world_folder, world):
    """The page reads manifest.tokenizer.kind == 'rwkv-world', fetches the vocab, and encodes like Python."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright (the Python package; never `playwright install`)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from rwkv_export.serve import serve_in_thread

    texts = [t for t in CORPUS if t][:40] + [EVAL_TEXT.read_text(encoding="utf-8")[:3000]]
    prompt = "RWKV是一种RNN 🙂 Привет"
    server, url = serve_in_thread(world_folder)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.set_default_timeout(60_000)
                page.goto(url + "?autoload=1")
                page.wait_for_function("['ready', 'error', 'load-failed'].includes(document.body.dataset.status)")
                assert page.evaluate("document.body.dataset.status") == "ready", page.inner_text("#error")
                assert page.evaluate("window.rwkvDemo.tokenizer.kind") == "rwkv-world"
                assert page.evaluate("window.rwkvDemo.tokenizer.verified") is True  # 127.0.0.1: crypto.subtle
                assert "tokenizer: rwkv-world" in page.inner_text("#model-summary")
                js_ids = page.evaluate("ts => ts.map((t) => window.rwkvDemo.encode(t))", texts)
                js_text = page.evaluate("ts => ts.map((t) => window.rwkvDemo.decode(window.rwkvDemo.encode(t)))", texts)
                res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: 12})", prompt)
                assert not errors, errors
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    for text, ids, back in zip(texts, js_ids, js_text, strict=True):
        assert ids == world.encode(text), f"page encode mismatch for {text!r:.80}"
        assert back == text
    assert res["promptIds"] == world.encode(prompt)
    assert 0 not in res["ids"]  # the page stops at end-of-text (id 0), as `rwkv-export generate` does
    assert res["text"] == world.decode(res["ids"])
