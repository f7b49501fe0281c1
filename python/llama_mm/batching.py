"""Continuous batching: many concurrent requests on one model (the engine under `llama-mm serve`).

    engine = BatchEngine(model, max_batch=16, kv_cache_mb=512)
    handle = engine.submit(inputs, max_new_tokens=64, params=SamplingParams(), stop_ids=[128009], on_event=print)
    ...
    engine.close()

A request's images are encoded in the caller's thread (submit: the vision tower and the cross layers' K/V, skipped
for images the image cache holds), one request's images at a time across threads (on a
few cores, concurrent encodings would only take turns and crowd out the decode steps); an engine thread drives the
native scheduler (`llama_mm._C.Scheduler`, cpp/engine/scheduler.h) step by step with the GIL released, and calls
each request's on_event from that thread, in order: one TokenEvent per generated token, then exactly one
FinishEvent. A request's tokens do not depend on the other requests in the batch (batch-invariant kernels), so
greedy output served among others is the output served alone.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .engine import Engine, native_module, request_tensors, to_native
from .image_cache import ImageCache
from .model import MllamaModel
from .sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_BATCH = 64  # the native kernels' batch-invariant limit


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None  # log-softmax of the raw logits (float32), when logprobs > 0
    top_logprobs: list[tuple[int, float]] | None = None  # the top-k (id, logprob), best first


@dataclass
class FinishEvent:
    reason: str  # "stop" (a stop id) | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class QueueFull(RuntimeError):
    """max_queue requests are already waiting."""


class RequestTooLarge(ValueError):
    """The request can never fit the KV pool or the model context (the message names the numbers)."""


Callback = Callable[[TokenEvent | FinishEvent], None]


class RequestHandle:
    def __init__(self, engine: "BatchEngine", request_id: int):
        self._engine, self.id = engine, request_id

    def cancel(self) -> None:
        """Ends the request (thread-safe, idempotent): its KV blocks are free before the next step, and its
        FinishEvent("cancelled") follows unless it had already finished."""
        self._engine._cancel(self.id)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class BatchEngine:
    def __init__(self, model: MllamaModel, *, max_batch: int = 16, kv_cache_mb: float = 512, block_size: int = 16,
                 prefill_chunk: int = 256, max_queue: int = 256, image_cache_mb: float = 0):
        if _positive_int("max_batch", max_batch) > MAX_BATCH:
            raise ValueError(f"max_batch must be <= {MAX_BATCH}, got {max_batch}")
        if not isinstance(kv_cache_mb, (int, float)) or not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb!r}")
        _positive_int("block_size", block_size)
        _positive_int("prefill_chunk", prefill_chunk)
        self.max_queue = _positive_int("max_queue", max_queue)
        self.model = model
        self.image_cache = ImageCache.from_mb(image_cache_mb)  # requests resending an image skip its encoding
        self._vision_lock = threading.Lock()
        self._engine = Engine(model)  # shares the model's weight tensors
        self._native = native_module().Scheduler(self._engine.native, max_batch, float(kv_cache_mb), block_size,
                                                 prefill_chunk)
        self._cond = threading.Condition()
        self._pending: list[tuple[int, tuple]] = []  # submitted, not yet handed to the native scheduler
        self._cancels: set[int] = set()
        self._callbacks: dict[int, Callback] = {}
        self._ids = itertools.count()
        self._closing = self._cancel_all = False
        self._stats = dict(running=0, waiting=0, waiting_for_blocks=0, kv_blocks_used=0,
                           kv_blocks_total=self._native.kv_blocks_total, kv_block_size=self._native.kv_block_size,
                           tokens_generated=0, requests_finished=0)
        self._thread = threading.Thread(target=self._run, name="llama_mm-batching", daemon=True)
        self._thread.start()

    # ---- the caller's side -----------------------------------------------------------------------------------------
    def submit(self, inputs: dict, *, max_new_tokens: int | None, params: SamplingParams, stop_ids: Sequence[int],
               logprobs: int = 0, on_event: Callback) -> RequestHandle:
        """Queues one prompt (the processor's dict for ONE prompt). max_new_tokens None: as many as the model's
        context and the whole KV pool allow for this prompt and its images (max_new_tokens_fitting). Raises
        QueueFull, RequestTooLarge or ValueError (bad inputs / sampling) here, before anything is queued."""
        if max_new_tokens is not None:
            _positive_int("max_new_tokens", max_new_tokens)
        _positive_int("logprobs", logprobs, minimum=0)
        if logprobs > self.model.cfg.text.vocab_size:
            raise ValueError(f"logprobs must be <= the vocabulary size {self.model.cfg.text.vocab_size}, "
                             f"got {logprobs}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        stop_ids = [int(i) for i in stop_ids]
        if not callable(on_event):
            raise ValueError("on_event must be callable")
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError("inputs['input_ids'] must be a [1, T] tensor (one prompt per request), got "
                             f"{None if ids is None else tuple(getattr(ids, 'shape', ()))}")
        self._check_fits(int(ids.shape[1]), max_new_tokens or 1, 0)  # the context limit, before the vision tower
        with self._vision_lock:  # one image encoding at a time, so the decode steps keep their share of the cores
            ids, mask, kv, cross, rows = request_tensors(self._engine, inputs, self.image_cache)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
        keep = mask[0].bool()  # a single prompt: drop any padding
        ids = ids[0, keep]
        if ids.numel() == 0:
            raise ValueError("the prompt has no tokens (attention_mask is all zero)")
        rows_in_table = self.model.cfg.text.vocab_size + 8
        if int(ids.min()) < 0 or int(ids.max()) >= rows_in_table:
            raise ValueError(f"input_ids outside the embedding table [0, {rows_in_table})")
        if kv is not None:
            cross, rows = cross[:, :, keep], rows[:, keep]  # (1, 1, T, S), (1, T, 1)
        image_tokens = 0 if kv is None else kv.shape[4]
        if max_new_tokens is None:
            max_new_tokens = max(1, self.max_new_tokens_fitting(ids.numel(), image_tokens))  # 0: refused below
        self._check_fits(ids.numel(), max_new_tokens, image_tokens)
        # the image cache's own K/V (one image, cached): once the prompt is in, the request reads the keys it attends in
        # place instead of copying them (a copy would free nothing while the cache holds them)
        shared = kv is not None and self.image_cache.holds(kv)
        args = (ids, kv, cross, rows, max_new_tokens, to_native(params), stop_ids, logprobs, shared)
        with self._cond:
            if self._closing:
                raise RuntimeError("BatchEngine is closed")
            if len(self._pending) + self._stats["waiting"] >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (max_queue)")
            rid = next(self._ids)
            self._pending.append((rid, args))
            self._callbacks[rid] = on_event
            self._cond.notify()
        return RequestHandle(self, rid)

    def max_new_tokens_fitting(self, prompt_tokens: int, image_tokens: int = 0) -> int:
        """The most new tokens a request of prompt_tokens (and image_tokens image keys) can be given: the model's
        context and the whole KV pool (what it could hold running alone); 0 when the prompt leaves none."""
        return int(self._native.max_new_tokens_fitting(prompt_tokens, image_tokens))

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int, image_tokens: int) -> None:
        why = self._native.fit_error(prompt_tokens, max_new_tokens, image_tokens)
        if why:
            raise RequestTooLarge(why)

    def stats(self) -> dict:
        """running, waiting, waiting_for_blocks (running requests that could not take a KV block at the last
        step), kv_blocks_used, kv_blocks_total, kv_block_size, tokens_generated (cumulative),
        requests_finished (cumulative) as of the last step; image_cache_hits / _misses (cumulative)."""
        cache = self.image_cache.stats()
        with self._cond:
            return dict(self._stats, waiting=self._stats["waiting"] + len(self._pending),
                        image_cache_hits=cache["hits"], image_cache_misses=cache["misses"])

    def close(self, cancel_running: bool = False) -> None:
        """Stops taking requests; lets the queued and running ones finish (or cancels them); joins the thread."""
        with self._cond:
            self._closing = True
            self._cancel_all = self._cancel_all or cancel_running
            self._cond.notify()
        self._thread.join()

    def _cancel(self, rid: int) -> None:
        with self._cond:
            if rid in self._callbacks:
                self._cancels.add(rid)
                self._cond.notify()

    # ---- the engine thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        native = self._native
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._cancels or native.has_work or self._closing):
                        self._cond.wait()
                    pending, self._pending = self._pending, []
                    self._stats["waiting"] += len(pending)  # queued natively now: still counted as waiting
                    cancels, self._cancels = self._cancels, set()
                    cancel_all = self._cancel_all
                events = []
                for rid, args in pending:
                    try:
                        native.add(rid, *args)
                    except Exception as e:  # checked in submit already: a failure here is a bug, reported
                        events.append((rid, -1, None, None, "error", str(e), int(args[0].numel()), 0))
                for rid in sorted(cancels):
                    events += native.cancel(rid)
                if cancel_all:
                    events += native.abort_all("cancelled", "")
                self._publish(events)
                if native.has_work:
                    try:
                        events = native.step()
                    except Exception as e:
                        log.exception("batching step failed")
                        events = native.abort_all("error", f"{type(e).__name__}: {e}")
                    self._publish(events)
                elif self._closing:
                    with self._cond:
                        if not self._pending:
                            return

    def _publish(self, events: list[tuple]) -> None:
        """Refreshes the stats, then delivers the events (stats already show the freed blocks)."""
        native = self._native
        with self._cond:
            s = self._stats
            s.update(running=native.running, waiting=native.waiting, waiting_for_blocks=native.waiting_for_blocks,
                     kv_blocks_used=native.kv_blocks_used)
            callbacks = []
            for rid, token, logprob, top, finish, error, prompt_tokens, completion_tokens in events:
                cb = self._callbacks.get(rid)
                if finish is None:
                    s["tokens_generated"] += 1
                    event = TokenEvent(token, logprob, [tuple(p) for p in top] if top is not None else None)
                else:
                    s["requests_finished"] += 1
                    self._callbacks.pop(rid, None)
                    self._cancels.discard(rid)
                    event = FinishEvent(finish, prompt_tokens, completion_tokens, error)
                if cb is not None:
                    callbacks.append((cb, event))
        for cb, event in callbacks:
            try:
                cb(event)
            except Exception:  # a broken callback must not stop the other requests
                log.exception("on_event callback failed")
