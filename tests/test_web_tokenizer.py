"""Parity of the web demo's JavaScript tokenizer (web_demo/tokenizer.js) with Python `tokenizers`.

Runs tests/js/tokenizer_cli.mjs under Node on a corpus and checks, for every string, that the
JS ids equal `tokenizers.Tokenizer.encode(text).ids`, that decoding matches Python's decode
(with and without special tokens) and round-trips, and that the streaming decoder's output,
concatenated, equals the full decode without printing U+FFFD mid-character.

Needs Node >= 20 and `npm ci --prefix web_demo`; without them the test fails (never skips).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web_demo"
CLI = ROOT / "tests" / "js" / "tokenizer_cli.mjs"
TOKENIZER_JSON = ROOT / "rwkv_export" / "data" / "20B_tokenizer.json"
SETUP_HINT = "install Node >= 20 and run `npm ci --prefix web_demo`"

LONG_PARAGRAPH = (
    "The RWKV language model is an RNN with transformer-level performance. It can be trained in "
    "parallel like a GPT, yet at inference time it carries only a fixed-size state from one token "
    "to the next, so memory does not grow with the length of the context. In this demo the model "
    "runs entirely in your browser: the weights are downloaded once, the tokenizer turns your "
    "prompt into ids (it's the GPT-NeoX 20B vocabulary, with 50,277 entries), and each step of the "
    "network produces logits for the next token, which we sample with temperature 0.8 and top-p "
    "0.9. Nothing you type leaves the page!  Résumé: naïve café owners in Zürich (and São Paulo) "
    "don't mind; they'll keep serving 3.14159 cups of coffee per hour, 24/7, until 2038-01-19T03:14:07Z. "
) * 6

CORPUS: list[str] = [
    "",
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing spaces   ",
    "a  b   c    d     e" + " " * 30 + "f",
    "\tone tab\t\ttwo tabs\t\t\t",
    "para one\n\n\npara two\n",
    "windows\r\nline\r\nendings\r\n",
    " \n \n\n  \t \r\n",
    "   ",
    "\n",
    # Unicode: accents (precomposed and decomposed: NFC normalizer), CJK, Arabic, combining marks.
    "Café résumé naïve Ångström Łódź œuvre",
    "e\u0301 vs \u00e9, A\u030a, n\u0303",
    "a\u0300\u0301\u0302\u0303\u0304 stacked combining marks",
    "中文字符和日本語のテキスト、한국어 텍스트。",
    "العربية: مرحبا بالعالم ١٢٣",
    "עברית שלום, Ελληνικά, Русский текст, हिन्दी",
    # Emoji incl. ZWJ sequences, skin tones, flags, keycaps.
    "🙂😀🎉 emoji",
    "family 👨\u200d👩\u200d👧\u200d👦 and 🏳\ufe0f\u200d🌈 ZWJ",
    "👍🏽 skin tone, flags 🇺🇸🇯🇵🇩🇪 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f, keycap 1\ufe0f\u20e3",
    # Code.
    'def fib(n):\n    """Fibonacci."""\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint([fib(i) for i in range(10)])\n',
    'class A:\n\tdef f(self):\n\t\treturn {"k": [1, 2.5, -3e10, null]}\n',
    '{"name": "rwkv", "vocab_size": 50277, "layers": [1, 2, 3], "ok": true, "nested": {"a": null}}',
    "for (let i = 0; i < n; i++) { x += a[i] * b[i]; } // C-like\n#include <stdio.h>",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    # Numbers.
    "0 1 12 123 1234 12345 123456789 3.14159 -42 1e-9 0x1F 1,000,000 ½ ² ⅔ ١٢٣٤",
    # Contractions.
    "it's don't we're I've I'm you'll he'd IT'S DON'T 'tis rock'n'roll",
    # Added tokens.
    "<|endoftext|>",
    "before<|endoftext|>after",
    " <|endoftext|> <|endoftext|><|endoftext|>",
    "<|padding|>x<|endoftext|>",
    "<|endoftext",
    "a" + " " * 4 + "b" + " " * 25 + "c",
    # Whitespace oddities where JavaScript's \s differs from the Rust (Oniguruma) regex.
    "x\u0085 next line",
    "\ufeffBOM at start and \ufeff inside",
    "nbsp\u00a0here, ideographic\u3000space, thin\u2009space, line\u2028sep, zwsp\u200bx",
    "vt\x0bff\x0cfs\x1cus\x1f nul\x00 del\x7f",
    "ŉĠĀ byte-level-looking chars",
    LONG_PARAGRAPH,
    "a" * 3000,
]

FUZZ_POOL = list(
    "ab Zé\u0301ü中文字日本語العربية🙂👨\u200d👩\u200d👧🇺🇸 \t\n\r\u00a0\u0085\ufeff\u2028\u3000\u200b\u2009\u1680"
    "'sterd0123456789١٢٣½²!?.,;:()[]{}\"<|>endoftext\x00\x7f\x0b\x1c\u0300\ud7ff\U0001f3fb"
) + ["<|endoftext|>", "<|padding|>", "    ", "'s", "'re", "'ll", "\r\n", " \n", "ŉ", "Ġ", "Ā", "  "]


def _fuzz_corpus(n: int = 600) -> list[str]:
    rng = random.Random(1234)
    return ["".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def _run_cli(payload: dict) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node not found on PATH: {SETUP_HINT}")
    if not (WEB / "node_modules").is_dir():
        pytest.fail(f"{WEB / 'node_modules'} is missing: run `npm ci --prefix web_demo`")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"node {version} is too old: {SETUP_HINT}")
    proc = subprocess.run(
        [node, str(CLI)], input=json.dumps(payload), capture_output=True, text=True, encoding="utf-8",
        cwd=ROOT, timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"{CLI.name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def hf_tok() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


def _check_stream(ids, chunks, flush, full, label):
    assert len(chunks) == len(ids), label
    assert "".join(chunks) + flush == full, f"streamed text != full decode for {label}"
    if "\ufffd" not in full:
        assert flush == "", label
        assert not any("\ufffd" in c for c in chunks), f"U+FFFD printed mid-stream for {label}"


def test_hf_tokenizer_matches_python(hf_tok):
    texts = CORPUS + _fuzz_corpus()
    ref_ids = [hf_tok.encode(t).ids for t in texts]
    # Decoding: the corpus encodings plus random id sequences (split/invalid UTF-8, special ids).
    rng = random.Random(99)
    vocab = hf_tok.get_vocab_size()
    random_seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 16))] for _ in range(300)]
    random_seqs += [[0, 1, 50276, 50254], [1], [10100, 0, 10100]]
    id_seqs = ref_ids + random_seqs
    out = _run_cli({"spec": {"kind": "hf-tokenizers", "json_path": str(TOKENIZER_JSON)},
                    "texts": texts, "id_seqs": id_seqs})

    for text, want, got in zip(texts, ref_ids, out["encode"], strict=True):
        assert got == want, f"encode mismatch for {text!r}"

    held_back = 0
    for i, ids in enumerate(id_seqs):
        label = f"ids {ids[:12]}" + (f" (text {texts[i]!r:.80})" if i < len(texts) else "")
        full = hf_tok.decode(ids, skip_special_tokens=False)
        assert out["decode"][i] == full, f"decode mismatch for {label}"
        assert out["decode_skip"][i] == hf_tok.decode(ids), f"decode(skipSpecialTokens) mismatch for {label}"
        if i < len(texts):
            assert full == unicodedata.normalize("NFC", texts[i]), f"round trip failed for {label}"
        _check_stream(ids, out["stream"][i], out["stream_flush"][i], full, label)
        if "\ufffd" not in full:
            held_back += sum(1 for c in out["stream"][i] if c == "")
    assert held_back > 0, "corpus never splits a character across tokens; streaming hold-back untested"


def test_bytes_tokenizer():
    texts = CORPUS
    ref_ids = [list(t.encode("utf-8")) for t in texts]
    rng = random.Random(7)
    random_seqs = [[rng.randrange(256) for _ in range(rng.randint(1, 12))] for _ in range(200)]
    id_seqs = ref_ids + random_seqs
    out = _run_cli({"spec": {"kind": "bytes", "vocab_size": 256}, "texts": texts, "id_seqs": id_seqs})
    for text, want, got in zip(texts, ref_ids, out["encode"], strict=True):
        assert got == want, f"bytes encode mismatch for {text!r}"
    for i, ids in enumerate(id_seqs):
        full = bytes(ids).decode("utf-8", errors="replace")
        assert out["decode"][i] == full, f"bytes decode mismatch for {ids}"
        if i < len(texts):
            assert full == texts[i]
        _check_stream(ids, out["stream"][i], out["stream_flush"][i], full, f"bytes {ids[:12]}")


def test_tokenizer_modules_have_no_bare_imports():
    """The demo is served as static files without an import map: only relative imports load."""
    spec_re = re.compile(r"""(?:\bimport\s*(?:[\w*{}\s,]+from\s*)?|\bimport\s*\(\s*|\bexport\s+[\w*{}\s,]+from\s*)['"]([^'"]+)['"]""")
    modules = sorted(WEB.glob("tokenizer*.js"))
    assert modules, "web_demo/tokenizer.js is missing"
    for path in modules:
        for spec in spec_re.findall(path.read_text(encoding="utf-8")):
            assert spec.startswith(("./", "../")), f"{path.name} imports bare specifier {spec!r}"
