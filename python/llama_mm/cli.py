"""`llama-mm`: generate, compare with transformers, run the built-in demo, fine-tune with LoRA."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the text decoder's linear weights on load (weight-only, symmetric)")
    p.add_argument("--group-size", type=int, default=128, help="inputs per quantization scale (default 128)")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: quantize lm_head too")


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed)


def _load_generator(a):
    from .generator import Generator

    t = time.perf_counter()
    gen = Generator(a.model, device=a.device, dtype=a.dtype, progress=True, quantize=a.quantize,
                    group_size=a.group_size, quantize_lm_head=a.quantize_lm_head)
    return gen, time.perf_counter() - t


def cmd_generate(a) -> int:
    if a.backend == "transformers":
        print(_transformers_run(a)[0])
        return 0
    import torch

    gen, load_s = _load_generator(a)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images = a.image or None
    start = time.perf_counter()
    first = None
    pieces = gen.stream(prompt=a.prompt, images=images, chat=a.chat, max_new_tokens=a.max_new_tokens,
                        **_sampling(a))
    for piece in pieces:
        first = first or time.perf_counter()
        print(piece, end="", flush=True)
    print()
    if a.stats:
        end = time.perf_counter()
        n = gen.last_token_count
        decode = (end - first) / max(1, n - 1) if first else float("nan")
        peak = (torch.cuda.max_memory_allocated() if a.device == "cuda" else _peak_rss()) / 2**30
        print(f"[stats] load {load_s:.2f} s | time to first token {((first or end) - start):.3f} s | "
              f"{n} tokens | decode {1 / decode if decode > 0 else float('inf'):.1f} tokens/s "
              f"({decode * 1e3:.1f} ms/token) | peak memory {peak:.2f} GiB", file=sys.stderr)
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _transformers_run(a):
    """The same request through transformers (greedy or sampled as asked): (text, last logits, inputs)."""
    import torch

    try:
        from transformers import MllamaForConditionalGeneration
    except ImportError:
        raise SystemExit("--backend transformers needs `pip install transformers`") from None
    from .generator import BUILTIN_DIR, Generator

    model_dir = a.model or BUILTIN_DIR
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    model = MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(a.device).eval()
    gen = Generator.__new__(Generator)  # only its processor and defaults: no native engine
    gen.init_text_side(model_dir)
    inputs = gen.request_inputs(a.prompt, a.image or None, a.chat)
    params = gen.sampling_params(**_sampling(a))
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

    from . import demo
    from .generator import Generator

    gen = Generator(device=a.device, progress=False)
    rng = random.Random(a.seed)
    spec = demo.random_spec(rng)
    image = demo.draw(spec)
    out = Path(a.output)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-mm", description="Run Llama 3.2 Vision (Mllama) checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images, streaming to stdout")
    _request_args(g)
    _sampling_args(g)
    g.add_argument("--stats", action="store_true", help="print time to first token, tokens/s and peak memory")
    g.add_argument("--backend", default="llama_mm", choices=["llama_mm", "transformers"])
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compare", help="run llama_mm and transformers on the same request")
    _request_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="draw a fresh image and caption it with the built-in model")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--output", default="llama_mm_demo.png")
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

    f = sub.add_parser("finetune", help="LoRA fine-tuning on a JSONL file of images and chats")
    f.set_defaults(func=None)

    args, rest = ap.parse_known_args(argv)
    if args.command == "finetune":
        from .train import main_finetune

        return main_finetune(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"llama-mm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
