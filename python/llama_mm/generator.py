"""Generator: the user-facing API. Preprocess -> vision encoder (PyTorch, once per request) -> native engine
(prefill + the C++ decode loop, GIL released) -> text.

    gen = llama_mm.Generator("path/to/Llama-3.2-11B-Vision-Instruct")
    print(gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                   images=["photo.jpg"]))
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .engine import Engine
from .model import load_model
from .sampling import SamplingParams

BUILTIN_DIR = Path(__file__).parent / "builtin"
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class Generator:
    """Loads a checkpoint directory (config.json, safetensors, tokenizer and processor files) once and generates.

    model_dir: a Hugging Face Mllama checkpoint directory; None loads the built-in demo model.
    device: "cpu" or "cuda" (default: cpu). dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
    """

    def __init__(self, model_dir: str | Path | None = None, device=None, dtype=None):
        from .processor import MllamaProcessor

        self.model_dir = Path(model_dir) if model_dir is not None else BUILTIN_DIR
        self.model = load_model(self.model_dir, device=device, dtype=dtype)
        self.processor = MllamaProcessor.from_pretrained(self.model_dir)
        self.cfg = self.model.cfg
        self.defaults, self.stop_ids, self.pad_id = _generation_defaults(self.model_dir, self.cfg)
        self.engine = Engine(self.model)
        self._lock = threading.Lock()  # one request at a time per engine (it owns the caches)

    # ---- sampling parameters -----------------------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        """Defaults from generation_config.json, overridden by the arguments that are not None."""
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - set(_SAMPLING_KEYS) - {"do_sample"}
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}")
        params = replace(self.defaults, **values)
        if "temperature" in values and values["temperature"] > 0 and "do_sample" not in values:
            params = replace(params, do_sample=True)  # asking for a temperature means sampling
        return params.validate()

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
        with self._lock:
            return self.engine.run(inputs, max_new_tokens, params, self.stop_ids, self.pad_id, callback)

    # ---- text in, text out -------------------------------------------------------------------------------------
    def prepare(self, image=None, prompt: str | Sequence[str] = "", images=None) -> dict:
        """Base-model prompts: `<|image|>` is prepended for each image when the prompt has none."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if image is not None and images is not None:
            raise ValueError("pass either image= or images=, not both")
        if image is not None:
            images = [[image]] if len(prompts) == 1 and not isinstance(image, (list, tuple)) else image
            images = [im if isinstance(im, (list, tuple)) else [im] for im in images]
        token = "<|image|>"
        if images is not None:
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompt(s) but images for {len(images)}")
            prompts = [p if token in p else token * len(ims) + p for p, ims in zip(prompts, images)]
        return self.processor(images=images, text=prompts, padding=True)

    def generate(self, image=None, prompt: str | Sequence[str] = "", max_new_tokens: int = 64,
                 temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None, seed=None,
                 stop: Sequence[str] | None = None, images=None):
        """One prompt -> str; a list of prompts (with a list of images, one or a list per prompt) -> list[str]."""
        inputs = self.prepare(image, prompt, images)
        out = self.generate_ids(inputs, max_new_tokens, stop=stop, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
        texts = [self._finish(row, stop) for row in out]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop=None, **sampling) -> Iterator[str]:
        """Yields the answer's text as it is produced (one prompt)."""
        if not isinstance(prompt, str):
            raise ValueError("stream() takes one prompt")
        inputs = self.prepare(image, prompt, sampling.pop("images", None))
        return self._stream(inputs, max_new_tokens, stop, sampling)

    def chat(self, messages: list[dict], images=None, max_new_tokens: int = 256, stream: bool = False, stop=None,
             **sampling):
        """Instruct checkpoints: renders the checkpoint's chat template; images fill the `{"type": "image"}` slots
        in order."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        imgs = None
        if images:
            imgs = [list(images) if isinstance(images, (list, tuple)) else [images]]
        inputs = self.processor(images=imgs, text=[text], padding=True)
        if stream:
            return self._stream(inputs, max_new_tokens, stop, sampling)
        return self._finish(self.generate_ids(inputs, max_new_tokens, stop=stop, **sampling)[0], stop)

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in self.stop_ids and int(i) != self.pad_id]
        return self.processor.decode(ids, skip_special_tokens=True)

    def _finish(self, ids, stop) -> str:
        text = self._decode(ids)
        for s in stop or ():
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def _stream(self, inputs, max_new_tokens, stop, sampling) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()
        emitted = [""]
        generated: list[int] = []

        def on_tokens(ids):
            generated.append(int(ids[0]))
            text = self._finish(generated, stop)
            if not text.endswith("\ufffd") and len(text) > len(emitted[0]):  # wait for whole UTF-8 characters
                pieces.put(text[len(emitted[0]):])
                emitted[0] = text
            return False

        error: list[BaseException] = []

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
    generated: list[list[int]] = [[] for _ in range(B)]
    hit = [False] * B

    def callback(ids) -> bool:
        for b in range(B):
            generated[b].append(int(ids[b]))
            if not hit[b]:
                text = gen._decode(generated[b])
                hit[b] = any(s in text for s in stop)
        stop_now = bool(inner(ids)) if inner else False
        return stop_now or all(hit)

    return callback


def _generation_defaults(model_dir: Path, cfg) -> tuple[SamplingParams, list[int], int]:
    """Sampling defaults, end ids and the pad id from generation_config.json (and config.json's text config)."""
    path = model_dir / "generation_config.json"
    raw = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    params = SamplingParams(
        do_sample=bool(raw.get("do_sample", False)),
        temperature=float(raw.get("temperature", 1.0)),
        top_k=int(raw.get("top_k", 50) or 0),  # transformers' default when the file has none
        top_p=float(raw.get("top_p", 1.0)),
        min_p=float(raw.get("min_p", 0.0) or 0.0),
        repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
    )
    try:
        params = params.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    eos = raw.get("eos_token_id", list(cfg.text.eos_token_id))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    stop_ids = sorted(set(eos) | set(cfg.text.eos_token_id))
    pad = raw.get("pad_token_id", cfg.text.pad_token_id)
    pad = (eos[0] if eos else 0) if pad is None else pad  # transformers falls back to the first end id
    return params, stop_ids, int(pad)
