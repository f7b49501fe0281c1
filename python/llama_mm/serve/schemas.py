"""Request bodies of the OpenAI-compatible routes as pydantic models: validation happens here, at the edge, and a
wrong type becomes a 400 naming the field (app.py). Fields the server does not act on are rejected only when they
would change the answer (`tools`, `response_format`, ...); unknown harmless ones (`user`, `metadata`) pass."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] = Field(...)
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Body):
    """What both routes share: budget, sampling, stops, n, streaming."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling(self) -> dict:
        """Keyword arguments for Generator.sampling_params (None: the checkpoint's default)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: None = None  # not supported: a request that sends tools gets a 400 naming the field
    response_format: None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy API: up to 5 alternatives
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    def token_budget(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
