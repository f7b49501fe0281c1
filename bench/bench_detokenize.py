"""Streaming an answer's text token by token: the tokenizer work per token, decoding all ids so far at every token
(what Generator.stream and the server did before session 11) against llama_mm.detokenize.TextStream (two short
windows per token), at answer lengths 64 .. 8192 tokens, one core, the benchmark checkpoint's Llama-3-style
byte-level tokenizer (128256 entries, tests/tokenizer_fixture.py). The answer: random words of a multilingual text,
so characters split across tokens too. Both run alternately, median of --rounds. Writes bench/results/detokenize.json.

    python bench/bench_detokenize.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import TEXT, run_header  # noqa: E402

WORDS = ("Grüße aus Köln — naïve café, 日本語のテキスト, emoji 😀🎉 and ASCII code: def f(x): return x ** 2 "
         "Ελληνικά, русский, العربية; ✓ ∑ ∫ ≠ ∞. the quick brown fox jumps over the lazy dog").split()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench/results/detokenize.json"))
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from llama_mm.detokenize import TextStream
    from tokenizer_fixture import write_tokenizer_files

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(Path(d), vocab_size=TEXT["vocab_size"])
        tok = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    def whole_decode(ids):  # every id so far at every token
        seen = []
        for i in ids:
            seen.append(i)
            decode(seen)

    def text_stream(ids):
        s = TextStream(decode)
        for i in ids:
            s.add(i)

    rng = random.Random(0)
    rows = {}
    for n in (64, 512, 2048, 8192):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(n)), add_special_tokens=False).ids[:n]
        times = {"whole_decode": [], "text_stream": []}
        for _ in range(args.rounds):
            for name, fn in (("whole_decode", whole_decode), ("text_stream", text_stream)):
                t = time.perf_counter()
                fn(ids)
                times[name].append((time.perf_counter() - t) / n)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[f"{n}_tokens"] = {"whole_decode_us_per_token": round(med["whole_decode"] * 1e6, 1),
                               "text_stream_us_per_token": round(med["text_stream"] * 1e6, 1),
                               "speedup": round(med["whole_decode"] / med["text_stream"], 1)}
        print(n, rows[f"{n}_tokens"], flush=True)
    out = {**run_header(__file__), "tokenizer": "tests/tokenizer_fixture.py, vocab 128256", "per_answer_length": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
