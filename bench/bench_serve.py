"""Serving benchmark on the CPU: `llama-mm serve` (continuous batching) at concurrency 1, 4, 16 and 64 against
sequential `Generator` calls and transformers' `generate` on a static batch of the same requests, in one run.

Model: bench_decode.py's ~450M random checkpoint (real vocabulary and text-stack shapes at reduced width, a small
vision tower at the real 560 px tile geometry) with a Llama-3.2-Vision-style tokenizer and chat template; one
560x560 image (one tile) per request, a short question, greedy, --new-tokens each.

Per concurrency c, the server gets c streaming requests at once (c = 1: --sequential requests one after another)
through the `openai` client; per request: time to first token (request sent -> first content chunk) and
per-token latency ((last chunk - first chunk) / (tokens - 1), tokens from the usage chunk); throughput = all
generated tokens / wall time of the wave. The baselines run in this process between the server's waves (the server
idles then), so all see the same machine load; each measurement is the best of --repeats rounds. The server runs
as its own process (`python -m llama_mm.cli serve`): its peak RSS is the server's peak memory. The physical limit
per batch size B: B / (bytes read per decode step (weights once + B requests' KV) / measured read bandwidth).

    python bench/bench_serve.py [--new-tokens 32] [--repeats 2] [--dtype float32] [--out bench/results/serve_cpu.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import TEXT, VISION, run_header, decode_bytes  # noqa: E402
from native import read_bandwidth  # noqa: E402

PROMPT = "Describe image {i} in detail, please."


def write_bench_checkpoint(d: Path) -> None:
    from checkpoints import build_reference, write_checkpoint
    from tokenizer_fixture import write_tokenizer_files

    write_tokenizer_files(d, vocab_size=TEXT["vocab_size"])
    write_checkpoint(d, build_reference(TEXT, VISION, seed=0, attn_implementation="sdpa"))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": TEXT["bos_token_id"], "eos_token_id": TEXT["eos_token_id"],
         "pad_token_id": TEXT["pad_token_id"], "do_sample": False}))


def images(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (560, 560, 3), dtype=np.uint8)) for _ in range(n)]


def percentiles(xs) -> dict:
    xs = np.asarray(xs, dtype=float)
    return {"p50": round(float(np.percentile(xs, 50)), 4), "p99": round(float(np.percentile(xs, 99)), 4)}


class Server:
    def __init__(self, model_dir, dtype, max_batch, kv_cache_mb, image_cache_mb):
        from serve_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.command = [sys.executable, "-m", "llama_mm.cli", "serve", "--model", str(model_dir), "--dtype", dtype,
                        "--port", str(self.port), "--max-batch", str(max_batch), "--kv-cache-mb", str(kv_cache_mb),
                        "--max-queue", "1024", "--image-cache-mb", str(image_cache_mb), "--log-level", "warning"]
        self.proc = subprocess.Popen(self.command, env=env)
        import httpx

        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)

    def peak_rss_gib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 2**30, 3)
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


async def server_wave(server: Server, messages: list, new_tokens: int, concurrent: bool) -> dict:
    """All requests at once (or one after another); per-request TTFT, per-token latency and tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=3600)

    async def one(msgs):
        t0 = time.perf_counter()
        stamps, tokens = [], 0
        stream = await client.chat.completions.create(model=server.model, messages=msgs, max_tokens=new_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return t0, stamps, tokens

    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one(m) for m in messages))
    else:
        results = [await one(m) for m in messages]
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": [r[1][0] - r[0] for r in results],
            "per_token_s": [(r[1][-1] - r[1][0]) / max(1, r[2] - 1) for r in results]}


def generator_sequential(gen, template_msgs: list, imgs: list, new_tokens: int) -> dict:
    start, tokens, ttft, per_token = time.perf_counter(), 0, [], []
    for msgs, im in zip(template_msgs, imgs):
        t0 = time.perf_counter()
        stamps = []
        for _ in gen.chat(msgs, images=[im], max_new_tokens=new_tokens, temperature=0, stream=True):
            stamps.append(time.perf_counter())
        tokens += gen.last_token_count
        ttft.append(stamps[0] - t0)
        per_token.append((stamps[-1] - stamps[0]) / max(1, gen.last_token_count - 1))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": ttft, "per_token_s": per_token}


def transformers_static(hf, gen, template_msgs, imgs, new_tokens: int) -> dict:
    """transformers' generate on the whole batch at once (left padding), greedy, exactly new_tokens each."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    texts = [gen.processor.apply_chat_template(m, add_generation_prompt=True) for m in template_msgs]
    start = time.perf_counter()
    inputs = gen.processor(images=[[im] for im in imgs], text=texts, padding=True)
    inputs = {k: v for k, v in inputs.items() if k != "num_tiles"}
    with torch.inference_mode():
        hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=TEXT["pad_token_id"], logits_processor=LogitsProcessorList([Stamp()]))
    wall = time.perf_counter() - start
    B = len(texts)
    per_token = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"tokens": B * new_tokens, "wall_s": wall, "tokens_per_s": B * new_tokens / wall,
            "ttft_s": [stamps[0] - start] * B, "per_token_s": [per_token] * B}


def summary(best: dict) -> dict:
    return {"tokens_per_s": round(best["tokens_per_s"], 3), "tokens": best["tokens"], "wall_s": round(best["wall_s"], 3),
            "ttft_s": percentiles(best["ttft_s"]), "per_token_s": percentiles(best["per_token_s"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--sequential", type=int, default=4, help="requests one after another at concurrency 1")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-cache-mb", type=int, default=2048)
    ap.add_argument("--images", default="distinct", choices=["distinct", "shared"],
                    help="distinct: a new image per request (each runs the vision tower once); shared: every request "
                         "asks about the same image (after the first, the server's and Generator's image caches "
                         "skip the vision tower: the batching engine alone; transformers still encodes it)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_cpu.json"))
    args = ap.parse_args()
    import llama_mm
    from llama_mm import image_cache
    from serve_server import data_url

    results = {"load_average_1m_before": round(os.getloadavg()[0], 2),
               **run_header(__file__),
               "model": {"text": TEXT, "vision": VISION, "dtype": args.dtype, "images": "one 560x560 image (1 tile) "
                         "per request" + (", the same for all" if args.images == "shared" else ", a new one each"),
                         "new_tokens": args.new_tokens, "greedy": True},
               "read_bandwidth": read_bandwidth()}
    n_max = max(args.concurrency)
    imgs = images(n_max) if args.images == "distinct" else images(1) * n_max
    openai_msgs = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im)}},
                                                 {"type": "text", "text": PROMPT.format(i=i)}]}]
                   for i, im in enumerate(imgs)]
    template_msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(i=i)}]}]
                     for i in range(n_max)]
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_checkpoint(Path(tmp))
        from transformers import MllamaForConditionalGeneration

        dtype = getattr(torch, args.dtype)
        # distinct images: no image cache anywhere (a wave must not reuse an earlier wave's encodings)
        cache_mb = 0 if args.images == "distinct" else image_cache.DEFAULT_MB
        gen = llama_mm.Generator(tmp, dtype=args.dtype, image_cache_mb=cache_mb)
        hf = MllamaForConditionalGeneration.from_pretrained(tmp, dtype=dtype).eval()
        prompt_tokens = gen.processor(images=[[imgs[0]]], text=[gen.processor.apply_chat_template(
            template_msgs[0], add_generation_prompt=True)])["input_ids"].shape[1]
        vision_tokens = (560 // 14) ** 2 + 1 + 7  # one tile, padded to a multiple of 8
        weights = decode_bytes(gen.model, 0, 0)
        per_request = decode_bytes(gen.model, vision_tokens, prompt_tokens + args.new_tokens // 2) - weights
        bandwidth = results["read_bandwidth"]["best_GBps"] * 1e9
        results["prompt_tokens"] = int(prompt_tokens)
        results["bytes_per_decode_step"] = {"weights": weights, "per_request_kv": per_request}
        results["read_bandwidth_limit_tokens_per_s"] = {
            f"b{c}": round(c * bandwidth / (weights + c * per_request), 2) for c in args.concurrency}
        server = Server(tmp, args.dtype, max_batch=n_max, kv_cache_mb=args.kv_cache_mb, image_cache_mb=cache_mb)
        results["server_command"] = " ".join(server.command)
        runs: dict[str, list] = {}

        def measure(name: str, fn) -> None:
            """One measurement, then the JSON rewritten with everything so far (a slow machine may not finish)."""
            runs.setdefault(name, []).append(fn())
            results["server_peak_rss_GiB"] = server.peak_rss_gib()
            write(results, runs, args)
            print(name, round(runs[name][-1]["tokens_per_s"], 3), "tokens/s", flush=True)

        try:
            for r in range(args.repeats):
                for c in args.concurrency:
                    n = args.sequential if c == 1 else c
                    measure(f"server_c{c}", lambda: asyncio.run(server_wave(server, openai_msgs[:n], args.new_tokens,
                                                                            concurrent=c > 1)))
                    if c == 1:
                        measure("generator_sequential", lambda: generator_sequential(
                            gen, template_msgs[:n], imgs[:n], args.new_tokens))
                    if c in args.hf_batches:
                        measure(f"transformers_static_b{c}", lambda: transformers_static(
                            hf, gen, template_msgs[:c], imgs[:c], args.new_tokens))
        finally:
            server.stop()
    print(f"wrote {args.out}")


def write(results: dict, runs: dict, args) -> None:
    results["bench_process_peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    results["runs"] = {name: summary(max(rs, key=lambda x: x["tokens_per_s"])) for name, rs in runs.items()}
    s = results["runs"]
    if "server_c1" in s and "server_c16" in s:
        results["targets"] = {
            "c16_over_c1_tokens_per_s": round(s["server_c16"]["tokens_per_s"] / s["server_c1"]["tokens_per_s"], 2),
            "c16_over_c1_per_token_p50": round(s["server_c16"]["per_token_s"]["p50"]
                                               / s["server_c1"]["per_token_s"]["p50"], 2),
            "wanted": "tokens/s ratio >= 6, per-token latency ratio <= 2"}
    results["load_average_1m_before_now"] = [results["load_average_1m_before"], round(os.getloadavg()[0], 2)]
    results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
