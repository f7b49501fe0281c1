"""The bridge between HTTP requests and the BatchEngine: messages -> chat template + images -> the processor's
tensors -> one engine request per choice (n > 1: seeds seed, seed+1, ...); engine events (from the engine's
thread) -> an asyncio queue -> incremental text, stop strings (which cancel the request), logprobs, usage."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator

from anyio import to_thread

from ..batching import FinishEvent, QueueFull, RequestTooLarge, TokenEvent
from ..detokenize import AnswerText
from ..sampling import SamplingParams
from .errors import APIError, bad_request
from .media import MediaError, MediaLimits, load_image
from .metrics import Metrics
from .responses import Logprob
from .schemas import ChatCompletionRequest, CompletionRequest

QUEUE_RETRY_AFTER_S = 1


@dataclass
class Prepared:
    """One prompt, ready for the engine."""
    inputs: dict
    prompt_tokens: int
    max_new_tokens: int | None  # None: as many as fit (BatchEngine.submit)
    params: SamplingParams
    stops: list[str]
    logprobs: int | None  # None: none; k: the chosen token's logprob and k alternatives


class Choice:
    """One engine request's output as it arrives: ids, text (cut at a stop string), logprobs, finish reason."""

    def __init__(self, index: int, service: "Service", prepared: Prepared, started: float):
        self.index, self.service, self.prepared, self.started = index, service, prepared, started
        self.answer = AnswerText(service.processor.decode, service.stop_ids, prepared.stops)
        self.sent = 0  # characters of text already streamed
        self.logprobs: list[Logprob] = []
        self.sent_logprobs = 0
        self.handle = None
        self.finish: FinishEvent | None = None
        self.last_token_at: float | None = None

    def record(self, ev: TokenEvent | FinishEvent) -> None:
        """Metrics, in the engine's thread as each event happens (also for a client that has gone away)."""
        metrics = self.service.metrics
        if isinstance(ev, FinishEvent):
            metrics.finished("stop" if ev.reason == "cancelled" and self.stopped_by_string else ev.reason)
            return
        now = time.perf_counter()
        metrics.token_latency(self.started if self.last_token_at is None else self.last_token_at, now,
                              first=self.last_token_at is None)
        self.last_token_at = now

    @property
    def text(self) -> str:
        """The answer so far (whole characters), cut at the first stop string."""
        return self.answer.text

    @property
    def stopped_by_string(self) -> bool:
        return self.answer.stopped

    def on_token(self, ev: TokenEvent) -> None:
        if self.answer.stopped or self.answer.ended or self.finish is not None:
            return  # tokens the engine made before it saw the cancel
        grew = self.answer.add(ev.token_id)
        if self.answer.ended:
            return  # a stop id: not part of the answer
        if self.prepared.logprobs is not None and ev.logprob is not None:
            top = list(ev.top_logprobs or [])[: self.prepared.logprobs]
            self.logprobs.append(Logprob(ev.token_id, float(ev.logprob), [(int(i), float(lp)) for i, lp in top]))
        if grew and self.answer.stopped and self.handle is not None:
            self.handle.cancel()

    def on_finish(self, ev: FinishEvent) -> None:
        self.finish = ev
        self.answer.finish()  # the whole answer decoded once: exactly what a one-shot decode gives

    @property
    def finish_reason(self) -> str | None:
        if self.finish is None:
            return None
        if self.stopped_by_string:
            return "stop"
        return self.finish.reason

    def pending_text(self, final: bool) -> str:
        """Text not yet streamed, holding back anything that may begin a stop string until the end (an incomplete
        UTF-8 character never reaches self.text before the end: TextStream)."""
        end = len(self.text)
        if not final:
            for s in self.prepared.stops:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k], 0, end):
                        end -= k
                        break
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece

    def pending_logprobs(self) -> list[Logprob]:
        out = self.logprobs[self.sent_logprobs:]
        self.sent_logprobs = len(self.logprobs)
        return out


class Run:
    """The choices of one HTTP request and the queue their engine events arrive on."""

    def __init__(self, choices: list[Choice]):
        self.choices = choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def listener(self, index: int):
        choice = self.choices[index]

        def on_event(ev):  # engine thread
            choice.record(ev)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))
        return on_event

    async def events(self) -> AsyncIterator[Choice]:
        """Applies each event to its choice and yields the choice, until every choice has finished."""
        while any(c.finish is None for c in self.choices):
            index, ev = await self.queue.get()
            choice = self.choices[index]
            if isinstance(ev, FinishEvent):
                choice.on_finish(ev)
            else:
                choice.on_token(ev)
            yield choice

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish is None and c.handle is not None:
                c.handle.cancel()


class Service:
    """Holds the checkpoint's text side (a Generator without weights: processor, config, defaults, stop ids) and
    the BatchEngine; turns validated requests into Runs."""

    def __init__(self, text_side, engine, model_id: str, limits: MediaLimits, metrics: Metrics):
        self.gen, self.engine, self.model_id, self.limits, self.metrics = text_side, engine, model_id, limits, metrics
        self.processor = text_side.processor
        self.stop_ids = set(text_side.stop_ids)
        self.context = text_side.cfg.text.max_position_embeddings

    # ---- requests -> Prepared ------------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        messages, urls = [], []
        for m, msg in enumerate(req.messages):
            if isinstance(msg.content, str):
                messages.append({"role": msg.role, "content": msg.content})
                continue
            parts = []
            for p, part in enumerate(msg.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                param = f"messages[{m}].content[{p}].image_url"
                if msg.role != "user":
                    raise bad_request(f"{param}: images can only be in user messages, not in a {msg.role!r} "
                                      "message", param)
                parts.append({"type": "image"})
                urls.append((part.image_url.url, param))
            messages.append({"role": msg.role, "content": parts})
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ValueError as e:
            raise bad_request(f"messages: {e}", "messages") from None
        slots = text.count(self.processor.image_token)
        if slots != len(urls):
            raise bad_request(f"messages: the rendered prompt has {slots} {self.processor.image_token} slot(s) for "
                              f"{len(urls)} image(s) (images fill image slots in order; text may not hold "
                              f"{self.processor.image_token} itself)", "messages")
        try:
            images = [await load_image(url, self.limits, param) for url, param in urls]
        except MediaError as e:
            raise bad_request(str(e), e.param) from None
        return await self._prepare(req, text, images, "messages")

    async def prepare_completion(self, req: CompletionRequest) -> list[Prepared]:
        return [await self._prepare(req, p, [], f"prompt[{i}]" if isinstance(req.prompt, list) else "prompt")
                for i, p in enumerate(req.prompts())]

    async def _prepare(self, req, text: str, images: list, param: str) -> Prepared:
        try:
            inputs = await to_thread.run_sync(lambda: self.processor(images=[images] if images else None,
                                                                     text=[text]))
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param) from None
        T = int(inputs["input_ids"].shape[1])
        budget = req.token_budget()  # None (OpenAI's default): as many as the context and the KV pool allow
        if budget is not None and T + budget > self.context:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise bad_request(f"the prompt has {T} tokens; with {name} {budget} that is {T + budget}, beyond the "
                              f"model's context of {self.context} tokens", name, "context_length_exceeded")
        sampling = req.sampling()
        try:
            params = self.gen.sampling_params(**sampling)
        except (TypeError, ValueError) as e:
            field = str(e).split(" ", 1)[0]
            raise bad_request(str(e), field if field in sampling else None) from None
        if params.do_sample and req.seed is None:
            params = replace(params, seed=random.randrange(2**62))
        return Prepared(inputs, T, budget, params, req.stop_strings(), req.logprob_count())

    # ---- Prepared -> Run -----------------------------------------------------------------------------------
    async def start(self, prepared: list[Prepared], n: int, received: float) -> Run:
        """Submits n choices per prompt (seeds seed, seed+1, ...); on any refusal cancels what was submitted.
        received: when the request arrived (time.perf_counter()), where time to first token starts."""
        choices = [Choice(i * n + j, self, p, received) for i, p in enumerate(prepared) for j in range(n)]
        run = Run(choices)
        try:
            for c in choices:
                p, j = c.prepared, c.index % n
                params = replace(p.params, seed=(p.params.seed + j) % 2**63)
                c.handle = await to_thread.run_sync(lambda: self.engine.submit(
                    p.inputs, max_new_tokens=p.max_new_tokens, params=params, stop_ids=self.gen.stop_ids,
                    logprobs=0 if p.logprobs is None else max(1, p.logprobs), on_event=run.listener(c.index)))
        except BaseException as e:
            run.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}", code="queue_full",
                               type="server_busy", headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)}) from None
            if isinstance(e, (RequestTooLarge, ValueError)):
                raise bad_request(str(e), code="request_too_large" if isinstance(e, RequestTooLarge) else None) \
                    from None
            if isinstance(e, RuntimeError):  # the engine is closed: the server is shutting down
                raise APIError(503, f"the server is not taking requests: {e}", code="unavailable",
                               headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)}) from None
            raise
        return run
