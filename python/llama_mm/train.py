"""LoRA fine-tuning of an Mllama checkpoint on image + chat JSONL data.

Pipeline: JSONL rows are checked up front (every problem reported with its line number before any training) ->
rendered with the chat template and tokenised, labels on assistant tokens only -> per step, `grad_accum` right-padded
micro-batches -> AdamW on the LoRA weights (optionally under bf16/fp16 autocast, with gradient checkpointing) ->
checkpoints `output_dir/checkpoint-N` holding everything needed to resume exactly (adapter, optimizer, scheduler,
grad scaler, RNG states, step, epoch, data order) -> the final adapter in `output_dir` (PEFT format).

A JSONL row (image paths relative to the JSONL file's folder; one {"type": "image"} part per listed image):
    {"images": ["img/0.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]}

The loss of a step is the mean token cross-entropy over all assistant tokens of its micro-batches (summed per
micro-batch, divided by the step's assistant-token count), so `batch_size=2, grad_accum=1` and
`batch_size=1, grad_accum=2` give the same update.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lora import DEFAULT_TARGETS, apply_lora, load_adapter, save_adapter
from .weights import read_safetensors

IGNORE = -100  # label of tokens that are not trained on
_ROLES = ("system", "user", "assistant")
_MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
               "cross_attention_mask")
_PAD = {"input_ids": None, "labels": IGNORE}  # every other key pads with 0 (None: the tokenizer's pad id)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_STATE_FILE, _TENSORS_FILE = "trainer_state.json", "trainer_state.safetensors"


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 1
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    autocast: str | None = None  # "bf16", "fp16" or None (compute in the weights' dtype)
    dtype: str = "auto"  # the base weights' dtype when loading ("auto": the checkpoint's)
    device: str | None = None  # None: cuda if available, else cpu
    gradient_checkpointing: bool = False
    seed: int = 0
    warmup_steps: int = 0  # linear warm-up, then linear decay to 0 at the last step
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (also sets the schedule's length)
    log_every: int = 10
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        for name in ("epochs", "batch_size", "grad_accum", "r", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "save_every"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"TrainConfig.{name} must be None or an integer >= 1, got {v!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.autocast not in (None, *_AUTOCAST):
            raise ValueError(f"TrainConfig.autocast must be one of None, 'bf16', 'fp16', got {self.autocast!r}")

    # fields that may differ between a run and its resumption (they do not change what is computed)
    RESUMABLE_CHANGES = ("device", "log_every", "save_every", "progress")


@dataclass
class TrainResult:
    output_dir: Path  # holds the final adapter (adapter_config.json, adapter_model.safetensors)
    steps: int
    history: list[dict] = field(default_factory=list)  # per logged step: step, epoch, loss, lr, tokens_per_s


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    """One checked JSONL row."""
    line: int
    images: list[Path]
    messages: list[dict]


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse and check every row; one ValueError listing each bad row by line number (missing or unreadable
    image, malformed JSON, malformed messages)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: training data file not found")
    examples, errors = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {line_no}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        problem = _row_problem(row)
        if problem is None:
            images = [path.parent / p for p in row.get("images", [])]
            for img in images:
                try:
                    with Image.open(img) as im:
                        im.size
                except FileNotFoundError:
                    problem = f"image {str(img)!r} not found"
                except OSError as e:
                    problem = f"image {str(img)!r} cannot be read ({e})"
                if problem:
                    break
        if problem:
            errors.append(f"line {line_no}: {problem}")
        else:
            examples.append(Example(line_no, images, row["messages"]))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{path}: {len(errors)} bad row(s):\n  " + "\n  ".join(errors[:20]) + more)
    if not examples:
        raise ValueError(f"{path}: no training rows")
    return examples


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    messages, images = row.get("messages"), row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return "'images' must be a list of image paths"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    n_image_parts, n_assistant = 0, 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            return f"{where} must be an object with 'role' one of {list(_ROLES)}"
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = content
        else:
            return f"{where}: 'content' must be a string or a non-empty list of parts"
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                if m["role"] == "assistant":
                    return f"{where}.content[{j}]: assistant messages cannot hold images"
                n_image_parts += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                return f"{where}.content[{j}]: a part must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}"
        if m["role"] == "assistant":
            n_assistant += 1
            if not any(p.get("text", "").strip() for p in parts):
                return f"{where}: assistant message with no text to train on"
    if n_assistant == 0:
        return "no assistant message (the loss is computed on assistant tokens only)"
    if n_image_parts != len(images):
        return f"{n_image_parts} image part(s) in the messages but {len(images)} path(s) in 'images'"
    return None


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans [start, end) of each assistant reply in it.

    For assistant turn i the template itself says what the reply is: rendering messages[:i+1] adds, after rendering
    messages[:i] with the generation prompt, the reply and its end-of-turn token (which the model must learn to
    produce). That generation prompt + reply is then located in the full rendering, after the previous reply (the
    parts before it may render differently in a shorter conversation, e.g. a system block that depends on images)."""
    def render(msgs, generation_prompt=False):
        return processor.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)

    text, spans, cursor = render(messages), [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, prompt, upto = render(messages[:i]), render(messages[:i], True), render(messages[: i + 1])
        if not (prompt.startswith(before) and upto.startswith(prompt)):
            raise ValueError(f"messages[{i}]: the chat template does not render this reply as an extension of the "
                             "conversation before it, so its tokens cannot be located")
        header, reply = prompt[len(before):], upto[len(prompt):]
        at = text.find(header + reply, cursor)
        if at < 0:
            raise ValueError(f"messages[{i}]: this reply, as the chat template renders it, is not in the rendering of "
                             "the whole conversation")
        spans.append((at + len(header), at + len(header) + len(reply)))
        cursor = spans[-1][1]
    return text, spans


def label_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens added) and labels: the id for a token that starts inside an assistant
    span, else IGNORE.

    A tokenizer that trims offsets (ByteLevel trim_offsets) reports a whitespace-only token as empty at its end: one
    empty at a span's start began before it (the header's whitespace), one empty further in belongs to the reply."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    labels = [tid if any(a <= start < b and (start < end or start > a) for a, b in spans) else IGNORE
              for tid, (start, end) in zip(enc.ids, enc.offsets)]
    return enc.ids, labels


class ChatDataset(Sequence):
    """JSONL rows, checked and tokenised up front; images are read and preprocessed when a row is fetched."""

    def __init__(self, path: str | Path, processor, max_length: int | None = None):
        """max_length: rows with more tokens (the model's context, max_position_embeddings) are errors."""
        self.processor, self.path = processor, Path(path)
        self.examples = read_jsonl(path)
        self.tokens, errors = [], []
        for ex in self.examples:
            try:
                text, spans = assistant_spans(processor, ex.messages)
            except Exception as e:  # a template error is a property of this row's messages
                errors.append(f"line {ex.line}: {e}")
                continue
            ids, labels = label_tokens(processor.tokenizer, text, spans)
            if all(lab == IGNORE for lab in labels):
                errors.append(f"line {ex.line}: no assistant tokens after tokenisation")
            if max_length is not None and len(ids) + 1 > max_length:  # + 1: the BOS the processor may add
                errors.append(f"line {ex.line}: {len(ids)} tokens, longer than the model's context of {max_length}")
            self.tokens.append((text, ids, labels))
        if errors:
            raise ValueError(f"{self.path}: {len(errors)} bad row(s):\n  " + "\n  ".join(errors[:20]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One row as the processor lays it out (batch dim 1) plus `labels` [1, L]."""
        from PIL import Image

        ex, (text, ids, labels) = self.examples[i], self.tokens[i]
        try:
            images = [Image.open(p).convert("RGB") for p in ex.images]
        except OSError as e:
            raise ValueError(f"{self.path} line {ex.line}: cannot read image ({e})") from None
        out = self.processor(images=[images] if images else None, text=[text], padding=True)
        got = out["input_ids"][0].tolist()
        # the processor may add special tokens (a BOS) around the text: find the text's tokens in its output
        at = next((k for k in range(len(got) - len(ids) + 1) if got[k:k + len(ids)] == ids), None)
        if at is None:
            raise ValueError(f"{self.path} line {ex.line}: the processor's token ids do not contain the tokenizer's "
                             "ids for the rendered chat")
        row = {k: out[k] for k in _MODEL_KEYS if k in out and (images or k in ("input_ids", "attention_mask"))}
        row["labels"] = torch.full((1, len(got)), IGNORE, dtype=torch.long)
        row["labels"][0, at:at + len(ids)] = torch.tensor(labels)
        return row


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows (each with batch dim 1), right-padding every dimension to the batch's largest: text with
    `pad_id` (attention 0, labels IGNORE), missing images with zero tiles that no text row attends to."""
    keys = [k for k in ("labels", *_MODEL_KEYS) if any(k in r for r in rows)]
    image_template = next((r for r in rows if "pixel_values" in r), None)
    batch = {}
    for k in keys:
        tensors = []
        for r in rows:
            if k in r:
                tensors.append(r[k])
            else:  # a text-only row in a batch with images: no image (N = 0)
                shape = list(image_template[k].shape)
                shape[2 if k == "cross_attention_mask" else 1] = 0
                if k == "cross_attention_mask":
                    shape[1] = r["input_ids"].shape[1]
                tensors.append(torch.zeros(shape, dtype=image_template[k].dtype))
        pad = _PAD.get(k, 0)
        pad = pad_id if pad is None else pad
        size = [len(rows)] + [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        out = torch.full(size, pad, dtype=tensors[0].dtype)
        for b, t in enumerate(tensors):
            out[(b, *(slice(0, s) for s in t.shape[1:]))] = t[0]
        batch[k] = out
    return batch


# ---------------------------------------------------------------------------------------------------- training
def enable_gradient_checkpointing(model) -> None:
    """Recompute each text decoder layer's and vision encoder layer's activations during backward instead of keeping
    them (torch.utils.checkpoint, non-reentrant, RNG state preserved so dropout masks repeat). Overrides `forward`
    on each layer instance: module and parameter names do not change."""
    for layer in _checkpointed_layers(model):
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)


def disable_gradient_checkpointing(model) -> None:
    for layer in _checkpointed_layers(model):
        layer.__dict__.pop("forward", None)


def _checkpointed_layers(model):
    return [*model.language_model.model.layers, *model.vision_model.transformer.layers,
            *model.vision_model.global_transformer.layers]


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits [B, T, V], labels [B, T] -> (summed cross-entropy of predicting labels[:, t+1] at t, token count)."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def data_order(seed: int, epoch: int, n: int) -> list[int]:
    """The row order of an epoch: a permutation fixed by (seed, epoch), independent of the global RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def accumulate_gradients(model, batches: list[dict], autocast: str | None = None, scaler=None) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step, adding to the parameters' .grad the
    gradient of (summed assistant-token cross-entropy / the step's assistant-token count). Returns (that loss,
    tokens processed)."""
    n_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    if n_labels == 0:
        raise ValueError("a training step has no assistant tokens to learn from")
    device = model.device
    total_loss, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=_AUTOCAST.get(autocast), enabled=autocast is not None):
            logits = model(**{k: batch[k] for k in _MODEL_KEYS if k in batch}).logits
        loss_sum, _ = masked_lm_loss(logits, batch["labels"])
        loss = loss_sum / n_labels
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return total_loss, tokens


def train(model, dataset: Sequence[dict], output_dir: str | Path, config: TrainConfig | None = None, *,
          resume: bool | str | Path | None = None, pad_id: int = 0,
          base_model_name_or_path: str | None = None) -> TrainResult:
    """Fine-tune LoRA adapters on `model` (an `MllamaModel` without adapters; they are added here from `config`).

    dataset: rows as `ChatDataset` returns them (dicts of tensors with batch dim 1, including `labels`).
    resume: True for the latest `output_dir/checkpoint-N`, or a checkpoint directory.
    The model is returned to eval mode, with its trained adapters in place (not merged)."""
    trainer = Trainer(model, dataset, Path(output_dir), config or TrainConfig(), pad_id, base_model_name_or_path)
    if resume:
        trainer.load(_resume_dir(trainer.output_dir, resume))
    model.train()
    try:
        trainer.run()
    finally:
        model.eval()
        disable_gradient_checkpointing(model)
    save_adapter(model, trainer.output_dir, base_model_name_or_path)
    return TrainResult(output_dir=trainer.output_dir, steps=trainer.state["step"], history=trainer.state["history"])


class Trainer:
    """The optimizer, schedule, scaler and position of one training run; `run` steps it to the end and writes
    checkpoints, `save`/`load` write and restore everything a run needs to continue exactly (no pickle:
    trainer_state.safetensors holds optimizer moments and RNG states, trainer_state.json the rest)."""

    def __init__(self, model, dataset, output_dir: Path, cfg: TrainConfig, pad_id: int, base_model: str | None):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.model, self.dataset, self.output_dir, self.cfg = model, dataset, output_dir, cfg
        self.pad_id, self.base_model = pad_id, base_model
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        apply_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.n_batches = math.ceil(len(dataset) / cfg.batch_size)
        steps_per_epoch = math.ceil(self.n_batches / cfg.grad_accum)
        self.total = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg.warmup_steps, self.total))
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=cfg.autocast == "fp16")
        # batches_done: micro-batches of the current epoch already trained on
        self.state = {"step": 0, "epoch": 0, "batches_done": 0, "data_order": data_order(cfg.seed, 0, len(dataset)),
                      "history": []}

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        bar = tqdm(total=self.total, initial=state["step"], disable=not cfg.progress, desc="finetune", unit="step")
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "seconds": 0.0}
        while state["step"] < self.total:
            start = time.perf_counter()
            loss, tokens = self.step()
            for key, value in (("loss", loss), ("tokens", tokens), ("steps", 1),
                               ("seconds", time.perf_counter() - start)):
                window[key] += value
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == self.total:
                entry = {"step": state["step"], "epoch": state["epoch"], "loss": window["loss"] / window["steps"],
                         "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / window["seconds"]}
                state["history"].append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                window = dict.fromkeys(window, 0)
            if state["step"] == self.total or (cfg.save_every and state["step"] % cfg.save_every == 0):
                self.save(self.output_dir / f"checkpoint-{state['step']}")
        bar.close()

    def step(self) -> tuple[float, int]:
        """One optimizer step over the next `grad_accum` micro-batches; returns (loss, tokens processed)."""
        cfg, state = self.cfg, self.state
        if state["batches_done"] >= self.n_batches:
            epoch = state["epoch"] + 1
            state.update(epoch=epoch, batches_done=0, data_order=data_order(cfg.seed, epoch, len(self.dataset)))
        group = range(state["batches_done"], min(state["batches_done"] + cfg.grad_accum, self.n_batches))
        order, bs = state["data_order"], cfg.batch_size
        batches = [collate([self.dataset[i] for i in order[b * bs:(b + 1) * bs]], self.pad_id) for b in group]
        loss, tokens = accumulate_gradients(self.model, batches, cfg.autocast, self.scaler)
        if cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        state["step"] += 1
        state["batches_done"] = group.stop
        return loss, tokens

    def save(self, directory: Path) -> None:
        """adapter (PEFT format) + trainer_state.safetensors + trainer_state.json."""
        from safetensors.torch import save_file

        save_adapter(self.model, directory, self.base_model)
        opt = self.optimizer.state_dict()
        tensors = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        for idx, (name, _) in enumerate(self.named):
            for key, value in opt["state"].get(idx, {}).items():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, directory / _TENSORS_FILE)
        meta = dict(self.state, scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
                    config=_config_json(self.cfg), parameters=[n for n, _ in self.named])
        (directory / _STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (the configuration must match, but for RESUMABLE_CHANGES)."""
        meta_path = directory / _STATE_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: cannot read the training state ({e})") from None
        saved, now = meta["config"], _config_json(self.cfg)
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in now
                 if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if diffs:
            raise ValueError(f"{directory}: cannot resume with a different configuration: " + "; ".join(diffs))
        if meta["parameters"] != [n for n, _ in self.named]:
            raise ValueError(f"{directory}: the checkpoint's trainable parameters differ from the model's")
        load_adapter(self.model, directory)
        tensors = read_safetensors(directory / _TENSORS_FILE)
        opt_state = {}
        for idx, (name, _) in enumerate(self.named):
            prefix = f"optimizer.{name}."
            entry = {k[len(prefix):]: t.clone() for k, t in tensors.items()
                     if k.startswith(prefix) and "." not in k[len(prefix):]}
            if entry:
                opt_state[idx] = entry
        groups = [dict(g, params=list(range(len(self.named)))) for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.cpu"].clone())
        cuda_states = [tensors[k].clone() for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self.state = {k: meta[k] for k in self.state}


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _resume_dir(output_dir: Path, resume) -> Path:
    if resume is True:
        found = sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*")
                       if p.name.split("-")[1].isdigit() and (p / _STATE_FILE).is_file())
        if not found:
            raise ValueError(f"{output_dir}: no checkpoint-N directory to resume from")
        return found[-1][1]
    path = Path(resume)
    if not (path / _STATE_FILE).is_file():
        raise ValueError(f"{path}: not a training checkpoint (no {_STATE_FILE})")
    return path


# ---------------------------------------------------------------------------------------------------- entry points
def finetune(model_dir: str | Path, data: str | Path, output_dir: str | Path, *,
             resume: bool | str | Path | None = None, **options) -> TrainResult:
    """Fine-tune a LoRA adapter for the checkpoint in `model_dir` on the JSONL file `data`; the adapter and the
    checkpoints go to `output_dir`. `options` are `TrainConfig` fields (epochs, lr, batch_size, grad_accum, r,
    alpha, dropout, target_modules, autocast, dtype, device, gradient_checkpointing, seed, max_steps, ...)."""
    from .config import MllamaConfig
    from .model import load_model
    from .processor import MllamaProcessor

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"finetune() got unknown option(s) {unknown}")
    cfg = TrainConfig(**options)
    processor = MllamaProcessor.from_pretrained(model_dir)
    context = MllamaConfig.from_pretrained(model_dir).text.max_position_embeddings
    dataset = ChatDataset(data, processor, max_length=context)  # every row is checked before the model is loaded
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device=device, dtype=cfg.dtype)
    pad_id = processor.pad_token_id if processor.pad_token_id is not None else model.cfg.text.pad_token_id
    return train(model, dataset, output_dir, cfg, resume=resume, pad_id=pad_id or 0,
                 base_model_name_or_path=str(model_dir))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `llama-mm finetune` options (defaults from TrainConfig)."""
    d = TrainConfig()
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (config.json, safetensors, tokenizer; default: the built-in model)")
    parser.add_argument("--data", required=True, help="training JSONL (image paths relative to its folder)")
    parser.add_argument("--output", required=True, help="output directory for the adapter and checkpoints")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scaling alpha / r)")
    parser.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    parser.add_argument("--target-modules", default=",".join(d.target_modules),
                        help="comma-separated PEFT module names (q_proj,...,fc1,multi_modal_projector), "
                             "'all-linear', or a regex over transformers' module names")
    parser.add_argument("--autocast", choices=["bf16", "fp16", "none"], default=d.autocast or "none")
    parser.add_argument("--dtype", default=d.dtype, help="base weight dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    parser.add_argument("--max-steps", type=int, default=d.max_steps)
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--save-every", type=int, default=d.save_every)
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from the latest checkpoint in --output, or from the given checkpoint directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> TrainResult:
    from .generator import BUILTIN_DIR

    targets = args.target_modules
    if _is_name_list(targets):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return finetune(
        args.model or BUILTIN_DIR, args.data, args.output, resume=args.resume, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, r=args.r, alpha=args.alpha, dropout=args.dropout,
        target_modules=targets, autocast=None if args.autocast == "none" else args.autocast, dtype=args.dtype,
        device=args.device, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, max_steps=args.max_steps, log_every=args.log_every,
        save_every=args.save_every, progress=not args.no_progress)


def _is_name_list(s: str) -> bool:
    """"q_proj,v_proj" is a list of names; "all-linear" and anything with regex syntax is passed as a string."""
    return s.lower() != "all-linear" and all(c.isalnum() or c in "_.," for c in s)


def cmd_finetune(args: argparse.Namespace) -> int:
    """`llama-mm finetune ...` (options from add_arguments): train, print where the adapter is."""
    result = run_from_args(args)
    print(f"adapter written to {result.output_dir} after {result.steps} steps")
    return 0
