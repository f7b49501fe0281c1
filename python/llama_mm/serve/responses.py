"""The JSON the routes answer, in OpenAI's shapes: chat completions and their stream chunks, legacy completions,
usage, and the two logprob formats (chat: `content[j] = {token, logprob, bytes, top_logprobs}`; legacy:
`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). Token strings come from the tokenizer's byte-level
vocabulary, so a token that is part of a UTF-8 character still has its exact bytes."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the `tokenizers` ByteLevel pre-tokenizer's): printable char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenText:
    """Token id -> its bytes and display string (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.byte_of = _byte_decoder()
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            piece = self.special.get(token_id)
            if piece is not None:
                data = piece.encode()
            else:
                raw = self.tokenizer.id_to_token(token_id) or ""
                if all(c in self.byte_of for c in raw):
                    data = bytes(self.byte_of[c] for c in raw)
                else:  # not a byte-level vocabulary: the decoder's text for the token
                    data = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
            hit = self.cache[token_id] = (data.decode("utf-8", errors="replace"), list(data))
        return hit


@dataclass
class Logprob:
    """One generated token's logprob and its alternatives [(id, logprob)]."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def chat_logprobs(entries: list[Logprob], text_of: TokenText) -> dict:
    def one(token_id, lp):
        token, data = text_of(token_id)
        return {"token": token, "logprob": lp, "bytes": data}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[Logprob], text_of: TokenText, offset: int) -> dict:
    tokens, offsets = [], []
    for e in entries:
        token = text_of(e.token_id)[0]
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text_of(i)[0]: lp for i, lp in e.top} for e in entries], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Envelope:
    """id, object, created and model of one response and its stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def wrap(self, choices: list[dict], stream: bool, **extra) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def choice(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
               stream: bool, first: bool = False) -> dict:
        """One choice (text None: a stream chunk without content, e.g. the last one with finish_reason)."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        if not stream:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
