"""Generator: the user-facing API. Preprocess -> vision tower (PyTorch, once per request) -> native engine
(prefill + the C++ decode loop, GIL released) -> text.

    gen = llama_mm.Generator("path/to/Llama-3.2-11B-Vision-Instruct")
    print(gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                   images=["photo.jpg"]))
    print(gen.generate("photo.jpg", "What is in this photo?"))

Plain prompts (`generate`, `stream`) go through the checkpoint's chat template when the checkpoint is a chat model
(Instruct checkpoints and the built-in model: see `chat_by_default`), and are sent raw to base checkpoints;
`chat=True` / `chat=False` overrides that per call.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
import torch

from . import image_cache
from .detokenize import AnswerText, cut_at_stops
from .engine import Engine
from .model import load_model
from .sampling import SamplingParams

BUILTIN_DIR = Path(__file__).parent / "builtin"
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
IMAGE_TOKEN = "<|image|>"


class Generator:
    """Loads a checkpoint directory (config.json, safetensors, tokenizer and processor files) once and generates.

    model_dir: a Hugging Face Mllama checkpoint directory; None loads the built-in demo model.
    device: "cpu" or "cuda" (default: cpu). dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
    progress: show a progress bar while the weights load.
    adapter: a LoRA adapter directory (PEFT format) to run with; merge_adapter=True folds it into the weights
    (fastest), False keeps it separate (the engine adds its low-rank update to each adapted projection).
    image_cache_mb: memory budget (MiB) of the cache of encoded images (LRU; 0 disables it): a chat that resends
    its image, or a batch that repeats one, skips its encoding (vision tower and cross-layer K/V, see image_cache.py).
    `self.image_cache.stats()` counts hits.
    quantize: "int8" / "int4" quantizes the text decoder's linear weights on load (group_size inputs per scale;
    quantize_lm_head=True quantizes lm_head too; activations="int8" multiplies them by int8 activations, faster on
    the CPU, not exact); see `load_model`. A quantized base runs adapters unmerged only.
    """

    def __init__(self, model_dir: str | Path | None = None, device=None, dtype=None, progress: bool = False,
                 adapter: str | Path | None = None, merge_adapter: bool = True,
                 image_cache_mb: float = image_cache.DEFAULT_MB, quantize: str | None = None,
                 group_size: int | None = 128, quantize_lm_head: bool = False, activations: str = "float"):
        self.image_cache = image_cache.ImageCache.from_mb(image_cache_mb)
        self.init_text_side(model_dir)
        self.model = load_model(self.model_dir, device=device, dtype=dtype, progress=progress, quantize=quantize,
                                group_size=group_size, quantize_lm_head=quantize_lm_head, activations=activations)
        if adapter is not None:
            from .lora import load_adapter, merge_lora

            load_adapter(self.model, adapter)
            if merge_adapter:
                merge_lora(self.model)
        self.engine = Engine(self.model)
        self._lock = threading.Lock()  # one request at a time per engine (it owns the caches)
        self.last_token_count = 0
        self.last_stats: dict[str, float] = {}

    def init_text_side(self, model_dir) -> None:
        """Processor, config and generation defaults: everything but the weights."""
        from .config import MllamaConfig
        from .processor import MllamaProcessor

        self.model_dir = Path(model_dir) if model_dir is not None else BUILTIN_DIR
        self.cfg = MllamaConfig.from_pretrained(self.model_dir)
        self.processor = MllamaProcessor.from_pretrained(self.model_dir)
        self.defaults, self.stop_ids, self.pad_id = generation_defaults(self.model_dir, self.cfg)
        self.chat_by_default = is_chat_checkpoint(self.processor, self.stop_ids)

    # ---- sampling parameters -----------------------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        """Defaults from generation_config.json, overridden by the arguments that are not None. A temperature > 0
        turns sampling on; temperature 0 is greedy."""
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}")
        params = replace(self.defaults, **values)
        if values.get("temperature", 0) > 0 and "do_sample" not in values:
            params = replace(params, do_sample=True)
        return params.validate()

    # ---- inputs --------------------------------------------------------------------------------------------------
    def request_inputs(self, prompt: str | Sequence[str], images=None, chat: bool | None = None) -> dict:
        """Processor tensors (left-padded) for one prompt (images: a list of images) or a batch (prompts, and per
        prompt a list). chat=True renders the checkpoint's chat template with the images first; chat=False sends the
        raw prompt, with one `<|image|>` per image in front when it has none (base checkpoints); None: the
        checkpoint's default (`chat_by_default`)."""
        chat = self.chat_by_default if chat is None else chat
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and single:
            images = [list(images)]
        if images is not None:
            images = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompt(s) but images for {len(images)}")
        texts = []
        for i, p in enumerate(prompts):
            n = len(images[i]) if images is not None else 0
            if chat:
                content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": p}]
                texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                                add_generation_prompt=True, tokenize=False))
            else:
                texts.append(p if IMAGE_TOKEN in p or n == 0 else IMAGE_TOKEN * n + p)
        return self.processor(images=images, text=texts, padding=True, padding_side="left")

    # ---- the core: processor output -> new token ids -------------------------------------------------------------
    def generate_ids(self, inputs: dict, max_new_tokens: int = 64, stop: Sequence[str] | None = None,
                     on_tokens=None, **sampling) -> torch.Tensor:
        """inputs: the processor's dict (input_ids, attention_mask and, with images, pixel_values,
        aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask). Returns new ids [B, N] (pad after a row
        stops). on_tokens(ids [B]) is called after every step; returning True stops."""
        params = self.sampling_params(**sampling)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        B, T = inputs["input_ids"].shape
        limit = self.cfg.text.max_position_embeddings
        if T + max_new_tokens > limit:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} = {T + max_new_tokens} "
                             f"exceeds the model context of {limit} positions")
        callback = _stop_string_callback(self, B, list(stop), on_tokens) if stop else on_tokens
        times: list[float] = []  # when each step's tokens came out of the engine (its thread, not a consumer's)

        def timed(ids) -> bool:
            times.append(time.perf_counter())
            return bool(callback(ids)) if callback else False

        with self._lock:
            start = time.perf_counter()
            out = self.engine.run(inputs, max_new_tokens, params, self.stop_ids, self.pad_id, timed,
                                  self.image_cache)
        ended = torch.isin(out[0], torch.tensor(self.stop_ids + [self.pad_id]))
        self.last_token_count = int(ended.nonzero()[0, 0]) + 1 if ended.any() else out.shape[1]
        self.last_stats = {"time_to_first_token_s": times[0] - start, "tokens": len(times),
                           "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1
                           else float("nan")}
        return out

    # ---- text in, text out -------------------------------------------------------------------------------------
    def generate(self, image=None, prompt: str | Sequence[str] = "", max_new_tokens: int = 64, *, images=None,
                 chat: bool | None = None, stop: Sequence[str] | None = None, **sampling):
        """One prompt -> str; a list of prompts -> list[str] (images: one list per prompt). chat: see
        `request_inputs` (default: the chat template for chat checkpoints, the raw prompt for base ones).
        Sampling: temperature, top_p, top_k, min_p, repetition_penalty, seed (defaults: generation_config.json)."""
        if image is not None and images is not None:
            raise ValueError("pass image= or images=, not both")
        return self.generate_text(prompt, image if images is None else images, chat, max_new_tokens, stop,
                                  **sampling)

    def chat(self, messages: list[dict], images=None, max_new_tokens: int = 256, stream: bool = False,
             stop: Sequence[str] | None = None, **sampling):
        """Instruct checkpoints: renders the chat template; images fill the `{"type": "image"}` slots in order."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        imgs = None if not images else [list(images) if isinstance(images, (list, tuple)) else [images]]
        inputs = self.processor(images=imgs, text=[text], padding=True, padding_side="left")
        if stream:
            return self._stream(inputs, max_new_tokens, stop, sampling)
        return self._finish(self.generate_ids(inputs, max_new_tokens, stop=stop, **sampling)[0], stop)

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 64, *, images=None, chat: bool | None = None,
               stop: Sequence[str] | None = None, **sampling) -> Iterator[str]:
        """Yields the answer's text as it is produced (one prompt)."""
        if not isinstance(prompt, str):
            raise ValueError("stream() takes one prompt")
        inputs = self.request_inputs(prompt, image if images is None else images, chat)
        return self._stream(inputs, max_new_tokens, stop, sampling)

    def generate_text(self, prompt, images=None, chat: bool | None = None, max_new_tokens: int = 64, stop=None,
                      **sampling):
        out = self.generate_ids(self.request_inputs(prompt, images, chat), max_new_tokens, stop=stop, **sampling)
        texts = [self._finish(row, stop) for row in out]
        return texts[0] if isinstance(prompt, str) else texts

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _decode(self, ids) -> str:
        ends = set(self.stop_ids) | {self.pad_id}
        kept = []
        for i in (int(t) for t in ids):
            if i in ends:
                break
            kept.append(i)
        return self.processor.decode(kept, skip_special_tokens=True)

    def _answer_text(self, stop) -> AnswerText:
        """The text of one answer as its tokens arrive (this checkpoint's end ids and pad end it)."""
        return AnswerText(self.processor.decode, set(self.stop_ids) | {self.pad_id}, stop)

    def _finish(self, ids, stop) -> str:
        return cut_at_stops(self._decode(ids), stop)[0]

    def _stream(self, inputs, max_new_tokens, stop, sampling) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()
        answer = self._answer_text(stop)
        emitted = [0]  # characters of answer.text yielded
        error: list[BaseException] = []

        def on_tokens(ids):
            if answer.add(int(ids[0])) and len(answer.text) > emitted[0]:  # whole UTF-8 characters only
                pieces.put(answer.text[emitted[0]:])
                emitted[0] = len(answer.text)
            return False

        def run():
            try:
                self.generate_ids(inputs, max_new_tokens, stop=stop, on_tokens=on_tokens, **sampling)
            except BaseException as e:  # re-raised in the consumer's thread
                error.append(e)
            finally:
                pieces.put(done)

        threading.Thread(target=run, daemon=True).start()
        while (piece := pieces.get()) is not done:
            yield piece
        if error:
            raise error[0]


def _stop_string_callback(gen: Generator, B: int, stop: list[str], inner):
    """Stops the loop once every row's text contains one of the stop strings."""
    rows = [gen._answer_text(stop) for _ in range(B)]

    def callback(ids) -> bool:
        for b in range(B):
            rows[b].add(int(ids[b]))
        stop_now = bool(inner(ids)) if inner else False
        return stop_now or all(r.stopped for r in rows)

    return callback


def is_chat_checkpoint(processor, stop_ids: Sequence[int]) -> bool:
    """Whether plain prompts should go through the chat template by default: the checkpoint has a template and
    stops on the token that ends a turn in it. Llama 3.2 Vision Instruct (and the built-in model) end turns with
    `<|eot_id|>` and list it among their eos ids; the base checkpoints stop only on `<|end_of_text|>`, so they get
    raw prompts even though their tokenizer ships a template."""
    if processor.chat_template is None:
        return False
    marker = "llama_mm_end_of_turn_probe"
    try:
        text = processor.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}],
                                             add_generation_prompt=False, tokenize=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError):  # no assistant turn: not applied by default
        return False
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = processor.tokenizer.encode(after, add_special_tokens=False).ids
    return bool(ids) and ids[0] in set(stop_ids)


def generation_defaults(model_dir: Path, cfg) -> tuple[SamplingParams, list[int], int]:
    """Sampling defaults, end ids and the pad id from generation_config.json (and config.json's text config), with
    transformers' defaults where the file is silent (top_k 50; pad falls back to the first end id)."""
    path = model_dir / "generation_config.json"
    raw = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        params = SamplingParams(
            do_sample=bool(raw.get("do_sample", False)),
            temperature=float(raw.get("temperature", 1.0)),
            top_k=int(raw.get("top_k", 50) or 0),
            top_p=float(raw.get("top_p", 1.0)),
            min_p=float(raw.get("min_p", 0.0) or 0.0),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
        ).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    eos = raw.get("eos_token_id", list(cfg.text.eos_token_id))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    stop_ids = list(dict.fromkeys(eos + list(cfg.text.eos_token_id)))
    pad = raw.get("pad_token_id", cfg.text.pad_token_id)
    pad = (stop_ids[0] if stop_ids else 0) if pad is None else pad
    return params, stop_ids, int(pad)
