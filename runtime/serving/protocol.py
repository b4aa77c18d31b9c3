"""The OpenAI-compatible wire format: request bodies (validated) and the error envelope.

Validation errors name the parameter and the rule, never echo the prompt or messages, so an error body or
log line cannot leak request text.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.runtime.model.sampling import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI parameters (user, presence_penalty, …) are accepted and ignored, as servers commonly do.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("give at most 16 non-empty stop strings")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        # With n > 1, each choice gets its own seed so the choices differ but stay reproducible.
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if not value:
            raise ValueError("the prompt is empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are served
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class AdapterLoadRequest(BaseModel):
    """POST /admin/adapters: load an addon of the deployment's account by its model name; the replica finds its
    adapter in the store. A path or URL is never taken from a request (`source` is refused by name)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="accounts/<the deployment's account>/models/<addon id>")
