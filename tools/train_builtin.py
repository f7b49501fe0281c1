"""Train the built-in demo model from scratch on the CPU: a tiny Mllama (the real architecture, every parameter
trained) that captions `llama_mm.demo` images, e.g. "a red circle above a blue square".

    PYTHONPATH=python python tools/train_builtin.py            # ~18 min on a shared 2-core CPU; writes config.json and
                                                               # model.safetensors into python/llama_mm/builtin/
    PYTHONPATH=python python tools/train_builtin.py --steps 50 --output /tmp/x   # a quick smoke run

Examples are presented exactly as `Generator.chat` presents them at inference: the chat template with the user
message [image, demo.PROMPT], rendered and tokenised by the package's own processor (so the text starts with the
processor's `<|begin_of_text|>` plus the template's), the image through the processor's tiling and
normalisation; the assistant turn is the caption + `<|eot_id|>`, and only those tokens carry loss.

Data: images are drawn from per-image seeds TRAIN_SEEDS (bench/ and tests draw from other ranges). They are
rendered once into a pool held as palette indices (demo images are flat colours, and the processor's
normalisation is a per-pixel affine map, so index -> normalised pixel is exact; `render_pool` checks it against
the processor). Seeded and deterministic (fixed thread count, fixed seeds, a fixed number of steps).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llama_mm import demo
from llama_mm.config import MllamaConfig
from llama_mm.model import MllamaModel
from llama_mm.processor import MllamaProcessor

BUILTIN = demo.BUILTIN_DIR
TRAIN_SEEDS = range(0, 1_000_000)  # per-image seeds of training images; bench uses 1_000_000+, tests 2_000_000+
CHECK_SEEDS = range(900_000, 900_512)  # held out from the pool (the pool is far smaller): progress checks
IGNORE = -100

# The tokenizer's ids (python/llama_mm/builtin/tokenizer.json): `<|image|>` = 512 = the text vocab_size.
VOCAB, BOS, PAD, EOS = 512, 501, 505, [502, 509, 510]  # <|begin_of_text|>, <|finetune_right_pad_id|>, ends

CONFIG = {  # the format transformers (5.x) writes for MllamaConfig
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": VOCAB,
    "model_type": "mllama",
    "dtype": "float32",
    "text_config": {
        "bos_token_id": BOS,
        "cross_attention_layers": [1, 3],
        "dropout": 0.0,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 384,
        "max_position_embeddings": 2048,
        "model_type": "mllama_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "num_key_value_heads": 2,
        "pad_token_id": PAD,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 256,
            "rope_theta": 500000.0,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": VOCAB,
    },
    "vision_config": {
        "attention_heads": 4,
        "hidden_act": "gelu",
        "hidden_size": 64,
        "image_size": demo.IMAGE_SIZE,
        "initializer_range": 0.02,
        "intermediate_layers_indices": [1, 2],
        "intermediate_size": 256,
        "max_num_tiles": 1,
        "model_type": "mllama_vision_model",
        "norm_eps": 1e-05,
        "num_channels": 3,
        "num_global_layers": 1,
        "num_hidden_layers": 4,
        "patch_size": 14,
        "supported_aspect_ratios": [[1, 1]],
        "vision_output_dim": 64 * 3,
    },
}


# ---- initialisation ------------------------------------------------------------------------------------------


def init_model(cfg: MllamaConfig, seed: int) -> MllamaModel:
    """A trainable MllamaModel with every parameter drawn here: linear/conv weights with unit-variance outputs
    (residual output projections scaled down by depth), embeddings N(0, 1), norms 1 and biases 0, and every tanh
    gate open at 0.5 (transformers starts gates at 0, which would leave cross-attention with no gradient at first)."""
    torch.manual_seed(seed)
    model = MllamaModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    depth = {"language_model": cfg.text.num_hidden_layers,
             "vision_model": cfg.vision.num_hidden_layers + cfg.vision.num_global_layers}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf and p.numel() == 1:  # tanh gates
                p.fill_(0.5)
            elif "norm" in name or "layernorm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif "embed" in name and p.dim() <= 2 and "patch_embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linear and conv weights [out, in, ...]
                std = p[0].numel() ** -0.5
                if leaf == "weight" and name.rsplit(".", 2)[-2] in ("o_proj", "down_proj", "fc2"):
                    std /= math.sqrt(2 * depth[name.split(".", 1)[0]])
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.language_model.model.inv_freq = cfg.text.rope.inv_freq(cfg.text.head_dim)
    return model.train().requires_grad_(True)


# ---- data ----------------------------------------------------------------------------------------------------


def user_message(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


class Pool:
    """Pre-rendered examples: palette-index images [N, S, S] uint8, the palette's normalised pixel values [K, 3]
    (from the processor), the generation prompt's token ids, and per example the whole conversation's ids."""

    def __init__(self, processor: MllamaProcessor, specs: list, answers: list[str], prompt: str):
        palette = [demo.BACKGROUND] + list(demo.COLOURS.values())
        self.palette_values = palette_values(processor, palette)  # (K, 3)
        S = demo.IMAGE_SIZE
        self.images = np.empty((len(specs), S, S), dtype=np.uint8)
        codes = [r << 16 | g << 8 | b for r, g, b in palette]
        for i, spec in enumerate(specs):
            rgb = np.asarray(demo.draw(spec), dtype=np.int64)
            packed = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]  # (S, S)
            if not np.isin(packed, codes).all():
                raise RuntimeError(f"image {i} has colours outside demo's palette (anti-aliased drawing?)")
            for k, code in enumerate(codes):
                self.images[i][packed == code] = k
            if i < 32:  # exactness: the palette reconstruction equals the processor's own output
                theirs = processor(images=[[demo.draw(spec)]], text=[processor.image_token])["pixel_values"]
                if not torch.equal(self.pixel_values(np.array([i])), theirs):
                    raise RuntimeError(f"image {i}: palette pixels differ from the processor's pixel_values")
        self.prompt_ids = tokenize(processor, processor.apply_chat_template(user_message(prompt)))
        cache: dict[str, list[int]] = {}
        self.ids = [cache.get(a) or cache.setdefault(a, full_ids(processor, prompt, a, self.prompt_ids))
                    for a in answers]
        self.image_token_id = processor.image_token_id

    def __len__(self) -> int:
        return len(self.images)

    def pixel_values(self, idx: np.ndarray) -> torch.Tensor:
        """[B, 1, 1, 3, S, S] float32, exactly the processor's pixel_values."""
        px = self.palette_values[torch.from_numpy(self.images[idx]).long()]  # (B, S, S, 3)
        return px.permute(0, 3, 1, 2).contiguous()[:, None, None]

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs for examples `idx`, right-padded (causal attention: padding after a row's end is unseen),
        with labels = the next token on assistant positions, IGNORE elsewhere."""
        rows = [self.ids[i] for i in idx]
        B, T, P = len(rows), max(len(r) for r in rows), len(self.prompt_ids)
        ids = torch.full((B, T), PAD, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
            labels[b, P - 1:len(r) - 1] = torch.tensor(r[P:])  # position t predicts token t + 1
        # The processor's rule for one image: every token from the <|image|> token on sees its (single) tile.
        xmask = ((ids == self.image_token_id).cumsum(1) > 0).long()[:, :, None, None]  # (B, T, 1, 1)
        ones = torch.ones(B, 1, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=self.pixel_values(idx),
                    aspect_ratio_ids=ones, aspect_ratio_mask=ones[:, :, None], cross_attention_mask=xmask,
                    labels=labels)


def palette_values(processor: MllamaProcessor, palette: list[tuple[int, int, int]]) -> torch.Tensor:
    """The processor's normalised value of each palette colour [K, 3], read from an image of colour bands."""
    from PIL import Image

    S = demo.IMAGE_SIZE
    band = S // len(palette)
    rgb = np.zeros((S, S, 3), dtype=np.uint8)
    for k, colour in enumerate(palette):
        rgb[k * band:(k + 1) * band] = colour
    px = processor(images=[[Image.fromarray(rgb)]], text=[processor.image_token])["pixel_values"][0, 0, 0]
    return torch.stack([px[:, k * band, 0] for k in range(len(palette))])  # (K, 3)


def tokenize(processor: MllamaProcessor, text: str) -> list[int]:
    """input_ids of a one-image prompt, as the processor makes them (the image's pixels play no part)."""
    from PIL import Image

    blank = Image.new("RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE), demo.BACKGROUND)
    return processor(images=[[blank]], text=[text])["input_ids"][0].tolist()


def full_ids(processor: MllamaProcessor, prompt: str, answer: str, prompt_ids: list[int]) -> list[int]:
    """Token ids of the whole conversation (user [image, prompt], assistant answer + <|eot_id|>), tokenised as the
    processor tokenises; checks that they extend the generation prompt's ids."""
    messages = user_message(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    ids = tokenize(processor, processor.apply_chat_template(messages, add_generation_prompt=False))
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the tokenised conversation for {answer!r} does not extend the generation prompt")
    return ids


# ---- training ------------------------------------------------------------------------------------------------


def loss_and_exact(model: MllamaModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy on assistant tokens, and per row whether every assistant token is the argmax (then greedy
    decoding reproduces the answer exactly)."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    hit = (logits.argmax(-1) == labels) | (labels == IGNORE)
    return loss, hit.all(dim=1)


def check(model: MllamaModel, pool: Pool, batch_size: int = 128) -> float:
    """Exact-answer rate (teacher-forced argmax, i.e. greedy) on the whole pool."""
    model.eval()
    exact = []
    with torch.no_grad():
        for s in range(0, len(pool), batch_size):
            exact.append(loss_and_exact(model, pool.batch(np.arange(s, min(s + batch_size, len(pool)))))[1])
    model.train()
    return torch.cat(exact).float().mean().item()


def param_groups(model: MllamaModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, gates or embeddings' positional vectors)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to lr / 10


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = MllamaProcessor.from_pretrained(BUILTIN)
    cfg = MllamaConfig.from_dict(CONFIG)
    if processor.image_token_id != cfg.text.vocab_size:
        raise ValueError(f"tokenizer's <|image|> id {processor.image_token_id} != vocab_size {cfg.text.vocab_size}")

    t0 = time.perf_counter()
    train_specs = [demo.random_spec(random.Random(s)) for s in TRAIN_SEEDS[:args.pool]]
    check_specs = [demo.random_spec(random.Random(s)) for s in CHECK_SEEDS]
    pool = Pool(processor, train_specs, [demo.caption(s) for s in train_specs], demo.PROMPT)
    held = Pool(processor, check_specs, [demo.caption(s) for s in check_specs], demo.PROMPT)
    print(f"rendered {len(pool)} training + {len(held)} check examples in {time.perf_counter() - t0:.0f} s",
          flush=True)

    model = init_model(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters, all trained", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    order = np.random.default_rng(args.seed)
    perm, cursor = order.permutation(len(pool)), 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        if cursor + args.batch > len(perm):
            perm, cursor = order.permutation(len(pool)), 0
        idx, cursor = perm[cursor:cursor + args.batch], cursor + args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss, exact = loss_and_exact(model, pool.batch(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            dt = time.perf_counter() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  batch exact {exact.float().mean().item():.2f}  "
                  f"{(step + 1) / dt:.2f} steps/s", flush=True)
        if (step + 1) % args.check_every == 0 or step == args.steps - 1:
            print(f"step {step + 1:5d}  held-out exact {check(model, held):.3f}", flush=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    save(model, Path(args.output))


def save(model: MllamaModel, out: Path) -> None:
    """config.json + model.safetensors (fp32, the checkpoints' key names = MllamaModel's state_dict names)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; the wheel ships it for everyone
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} ({size / 2**20:.1f} MiB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=24000, help="pre-rendered training images")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is the robust choice on a shared CPU")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--check-every", type=int, default=350)
    ap.add_argument("--output", default=str(BUILTIN))
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()
