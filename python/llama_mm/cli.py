"""`llama-mm`: generate, compare with transformers, run the built-in demo, fine-tune with LoRA."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the text decoder's linear weights on load (weight-only, symmetric)")
    p.add_argument("--group-size", type=int, default=128, help="inputs per quantization scale (default 128)")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: quantize lm_head too")
    p.add_argument("--activations", default="float", choices=["float", "int8"],
                   help="with quantized weights: int8 multiplies them by int8 activations (per 32 values, integer "
                        "products: faster on the CPU, not exact); float (default) keeps float32 products")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _quantize_args(p)


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the checkpoint's chat template (default: yes for chat checkpoints such as "
                        "Instruct and the built-in model, no for base checkpoints)")


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed)


def _check_images(a) -> None:
    """Image arguments are checked before any model is loaded (an 11B load takes minutes)."""
    for path in a.image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")


def _load_generator(a):
    from .generator import Generator

    t = time.perf_counter()
    gen = Generator(a.model, device=a.device, dtype=a.dtype, progress=True, adapter=getattr(a, "adapter", None),
                    merge_adapter=getattr(a, "merge_adapter", False), quantize=a.quantize, group_size=a.group_size,
                    quantize_lm_head=a.quantize_lm_head, activations=a.activations)
    return gen, time.perf_counter() - t


def cmd_generate(a) -> int:
    _check_images(a)
    if a.adapter is None and a.merge_adapter:
        raise ValueError("--merge-adapter needs --adapter DIR")
    if a.backend == "transformers":
        if a.adapter is not None:
            raise ValueError("--adapter runs with the llama_mm backend only")
        print(_transformers_run(a)[0])
        return 0
    import torch

    gen, load_s = _load_generator(a)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pieces = gen.stream(prompt=a.prompt, images=a.image or None, chat=a.chat, max_new_tokens=a.max_new_tokens,
                        **_sampling(a))
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if a.stats:
        # timed in the engine's thread as each token is produced (the stream's consumer may lag behind it)
        s = gen.last_stats
        decode = s["decode_s_per_token"]
        rate = f"{1 / decode:.1f} tokens/s ({decode * 1e3:.2f} ms/token)" if decode == decode else "n/a (1 token)"
        peak = (torch.cuda.max_memory_allocated() if a.device == "cuda" else _peak_rss()) / 2**30
        print(f"[stats] load {load_s:.2f} s | time to first token {s['time_to_first_token_s']:.3f} s | "
              f"{s['tokens']} tokens | decode {rate} | peak memory {peak:.2f} GiB", file=sys.stderr)
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _transformers_run(a):
    """The same request through transformers (greedy or sampled as asked): (text, last logits, inputs). The
    inputs are prepared (images read, prompt rendered) before transformers loads the model."""
    import torch

    try:
        from transformers import MllamaForConditionalGeneration
    except ImportError:
        raise SystemExit("--backend transformers needs `pip install transformers`") from None
    from .generator import BUILTIN_DIR, Generator

    model_dir = a.model or BUILTIN_DIR
    gen = Generator.__new__(Generator)  # only its processor and defaults: no native engine
    gen.init_text_side(model_dir)
    inputs = gen.request_inputs(a.prompt, a.image or None, a.chat)
    params = gen.sampling_params(**_sampling(a))
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    model = MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(a.device).eval()
    kwargs = dict(max_new_tokens=a.max_new_tokens, do_sample=params.do_sample, pad_token_id=gen.pad_id,
                  eos_token_id=gen.stop_ids)
    if params.do_sample:
        torch.manual_seed(params.seed)
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    with torch.inference_mode():
        inputs = {k: v.to(a.device) for k, v in inputs.items() if k != "num_tiles"}
        out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
        logits = model(**inputs).logits[:, -1].float()
    return gen._finish(out[0], None), logits, inputs


def cmd_compare(a) -> int:
    import torch

    _check_images(a)
    theirs, their_logits, inputs = _transformers_run(a)
    gen, _ = _load_generator(a)
    ours = gen.generate_text(a.prompt, a.image or None, a.chat, max_new_tokens=a.max_new_tokens, **_sampling(a))
    with torch.inference_mode():
        our_logits = gen.model(**{k: v.to(gen.model.device) for k, v in inputs.items()}).logits[:, -1].float()
    diff = (our_logits - their_logits.to(our_logits.device)).abs().max().item()
    print(f"llama_mm:     {ours}")
    print(f"transformers: {theirs}")
    print(f"identical text: {ours == theirs}; largest last-position logit difference: {diff:.3e} "
          f"(max |logit| {their_logits.abs().max().item():.3e})")
    return 0


def cmd_demo(a) -> int:
    import random
    import tempfile

    from . import demo
    from .generator import Generator

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="llama_mm_demo_")) / "shapes.png"
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    gen = Generator(device=a.device, progress=False)
    rng = random.Random(a.seed)
    spec = demo.random_spec(rng)
    image = demo.draw(spec)
    image.save(out)
    answer = gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]}],
                      images=[image], max_new_tokens=48, temperature=0)
    truth = demo.caption(spec)
    print(f"image:  {out}")
    print(f"model:  {answer}")
    print(f"truth:  {truth}")
    print("match" if answer.strip() == truth else "differs")
    return 0


def cmd_quantize(a) -> int:
    from .quant.checkpoint import write_quantized_checkpoint
    from .quant.scheme import QuantScheme

    if a.model is None:
        from .generator import BUILTIN_DIR

        a.model = BUILTIN_DIR
    if a.channel and a.group_size is not None:
        raise ValueError("--channel (one scale per output row) and --group-size exclude each other")
    group_size = None if a.channel else (128 if a.group_size is None else a.group_size)
    scheme = QuantScheme(a.bits, group_size, not a.asymmetric)
    t = time.perf_counter()
    r = write_quantized_checkpoint(a.model, a.out, scheme, progress=True)
    print(f"wrote {r.out_dir} in {time.perf_counter() - t:.1f} s: {len(r.quantized)} Linear weights quantized "
          f"({scheme.bits}-bit, {scheme.strategy}{'' if a.channel else f' {scheme.group_size}'}, "
          f"{'symmetric' if scheme.symmetric else 'asymmetric'}); tensors {r.bytes_before / 2**20:.1f} MiB -> "
          f"{r.bytes_after / 2**20:.1f} MiB")
    print("files: " + ", ".join(r.files))
    return 0

def cmd_serve(a) -> int:
    from .serve import main as serve_main

    return serve_main(a)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from . import image_cache
    from .serve import MAX_BODY_BYTES
    from .serve.media import MediaLimits

    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every /v1 route")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _quantize_args(p)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache pool (self- and cross-attention)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--image-cache-mb", type=float, default=image_cache.DEFAULT_MB,
                   help="encoded images kept for requests that send them again (0: off)")
    p.add_argument("--allowed-media-dir", default=None, help="folder image_url file: paths may be read from")
    p.add_argument("--max-image-bytes", type=int, default=MediaLimits.max_bytes)
    p.add_argument("--max-image-pixels", type=int, default=MediaLimits.max_pixels)
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-mm", description="Run Llama 3.2 Vision (Mllama) checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images, streaming to stdout")
    _request_args(g)
    _sampling_args(g)
    g.add_argument("--stats", action="store_true", help="print time to first token, tokens/s and peak memory")
    g.add_argument("--backend", default="llama_mm", choices=["llama_mm", "transformers"])
    g.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to run with")
    g.add_argument("--merge-adapter", action="store_true",
                   help="fold the adapter into the weights (faster decode; default: applied separately)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compare", help="run llama_mm and transformers on the same request")
    _request_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="draw a fresh image and caption it with the built-in model")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--out", "--output", dest="out", default=None,
                   help="where to save the drawn image (default: a new temporary folder)")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="write a compressed-tensors int4/int8 (pack-quantized) checkpoint")
    q.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--bits", type=int, required=True, choices=[4, 8])
    q.add_argument("--group-size", type=int, default=None, help="inputs per scale (default 128)")
    q.add_argument("--asymmetric", action="store_true", help="add a zero point per group")
    q.add_argument("--channel", action="store_true", help="one scale per output row instead of groups")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    _serve_args(s)
    s.set_defaults(func=cmd_serve)

    f = sub.add_parser("finetune", help="LoRA fine-tuning on a JSONL file of images and chats",
                       description="LoRA fine-tuning on image + chat JSONL data")
    from .train import add_arguments, cmd_finetune

    add_arguments(f)
    f.set_defaults(func=cmd_finetune)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"llama-mm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
