"""The OpenAI-compatible wire format: request bodies and the error envelope. Each rule on a client's value that
does not depend on the model is checked here, once; the engine trusts the SamplingParams built from them (the
vocabulary and the context are the model's: openai_routes and Engine.room check those).

Validation errors name the parameter and the rule, never echo the prompt or messages, so an error body or
log line cannot leak request text.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from jsonschema import exceptions, validators
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ember.runtime.model.grammar import json_grammar
from ember.runtime.model.sampling import MAX_LOGPROBS, SamplingParams


class _Strict(BaseModel):
    # Every field is applied or refused: an unknown one is a 400 naming it, and JSON types are taken as they are
    # ("0.5" is not a number, "yes" not a boolean, 2.0 not an integer). An explicit null means the default.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or (k in cls.model_fields
                                                                       and cls.model_fields[k].is_required())}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


# jsonschema's check recurses a few frames per level, so a schema a hundred levels deep ends in a RecursionError;
# real schemas nest a dozen levels or so (OpenAI's strict mode allows 10 levels of objects).
MAX_SCHEMA_DEPTH = 64  # nested JSON objects and arrays
# Checking a schema against its metaschema is pure Python that holds the GIL, up to ~170 µs a node (an anyOf of
# 10,000 empty schemas took 1.7 s): bounded across the whole request (its response format and every tool), so
# no request holds a worker thread, or slows the engine thread, for long.
MAX_SCHEMA_NODES = 5_000  # objects, arrays and values of all the request's schemas together
# Drafts before 4 give keywords other types (draft 3's `required` is a boolean): the grammar builder and
# llguidance read the later drafts only.
OLD_DRAFTS = ("http://json-schema.org/draft-03/schema", "http://json-schema.org/draft-02/schema",
              "http://json-schema.org/draft-01/schema")


def _schema_size(value: Any) -> tuple[int, bool]:
    """(nodes, deeper than MAX_SCHEMA_DEPTH) of a schema, walked without recursion (deep nesting is what it
    guards against) and given up at the bound."""
    stack, nodes = [(value, 1)], 0
    while stack and nodes <= MAX_SCHEMA_NODES:
        node, level = stack.pop()
        nodes += 1
        if isinstance(node, (dict, list)):
            if level > MAX_SCHEMA_DEPTH:
                return nodes, True
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return nodes, False


def _too_big(nodes: int) -> str:
    return f"the request's schemas are too big: more than {MAX_SCHEMA_NODES} objects, arrays and values in all"


def check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A user's JSON Schema against its metaschema: a ValueError naming the JSON pointer of the fault."""
    nodes, too_deep = _schema_size(schema)
    if too_deep:
        raise ValueError(f"the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")
    if nodes > MAX_SCHEMA_NODES:
        raise ValueError(_too_big(nodes))
    if isinstance(schema.get("$schema"), str) and schema["$schema"].rstrip("#").startswith(OLD_DRAFTS):
        raise ValueError("$schema: drafts before draft-04 are not served; use draft 2020-12 (the default)")
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as exc:
        pointer = "/" + "/".join(str(p) for p in exc.path)
        raise ValueError(f"the schema is invalid at {pointer}: {exc.message}") from None
    except RecursionError:  # within the depth limit, but a wide schema can still exhaust the stack
        raise ValueError("the schema nests too deeply to be checked") from None
    return schema


JSONSchema = Annotated[dict[str, Any], AfterValidator(check_schema)]  # a user's schema (response format, tool)


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: JSONSchema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it with type json_schema, and only then")
        return self

    def grammar(self) -> str | None:
        if self.type == "text":
            return None
        return json_grammar(self.json_schema.schema_ if self.json_schema else None)


# torch.Generator.manual_seed takes these (a negative seed wraps around); choice i of n is seeded seed + i.
MIN_SEED, MAX_SEED = -2**63, 2**64 - 1
# Token ids in ASCII digits: str.isdigit also takes "²", which int() refuses, and "٣", which int() reads as 3.
# Ten digits pass any vocabulary; the bound keeps int() off huge strings.
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _schemas_of(data: Any) -> list[Any]:
    """The JSON Schemas a raw request body carries (its response format's and its tools'), before validation."""
    if not isinstance(data, dict):
        return []
    schemas = []
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        schemas.append(response_format["json_schema"].get("schema"))
    for tool in data.get("tools") if isinstance(data.get("tools"), list) else ():
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            schemas.append(tool["function"].get("parameters"))
    return [schema for schema in schemas if schema is not None]


class _Common(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _schemas_bounded_together(cls, data: Any) -> Any:
        # before any schema meets its metaschema: 128 tools of a bounded schema each would still be minutes
        total = 0
        for schema in _schemas_of(data):
            total += _schema_size(schema)[0]
            if total > MAX_SCHEMA_NODES:
                raise ValueError(f"tools: {_too_big(total)}" if "tools" in data else
                                 f"response_format: {_too_big(total)}")
        return data

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: no limit")
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    logit_bias: dict[str, float] = Field(default_factory=dict, description="token id → bias in [-100, 100]")
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    user: str | None = Field(None, max_length=256, description="the caller's label for its end user: kept in the usage "
                                                                "record, as metadata")
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float]) -> dict[str, float]:
        keys: dict[int, str] = {}  # token id → the key that named it
        for token, bias in value.items():
            if not _TOKEN_ID.fullmatch(token):
                shown = repr(token[:12]) + ("…" if len(token) > 12 else "")
                raise ValueError(f"keys are token ids in ASCII digits, at most 10 of them; {shown} is not one")
            if int(token) in keys:  # "5" and "05": which of the two biases applies would be arbitrary
                raise ValueError(f"keys {keys[int(token)]!r} and {token!r} are the same token {int(token)}; "
                                 f"give each token once")
            keys[int(token)] = token
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} must be between -100 and 100")
        return value

    @model_validator(mode="after")
    def _options_need_their_switch(self) -> "_Common":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    @model_validator(mode="after")
    def _seeds_and_token_counts_fit(self) -> "_Common":
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed: choice i is seeded seed + i, and {self.seed} + {self.n - 1} passes {MAX_SEED}, "
                             f"the largest seed torch takes")
        given = self.given_max_tokens()
        if given is not None and self.min_tokens > given[1]:
            raise ValueError(f"min_tokens: {self.min_tokens} is more than {given[0]} {given[1]}")
        return self

    def given_max_tokens(self) -> tuple[str, int] | None:
        """The caller's limit on the output, as (parameter, value); None where the server's default applies."""
        return None if self.max_tokens is None else ("max_tokens", self.max_tokens)

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
        """A choice's parameters, from values this model has validated (SamplingParams checks none of them again);
        its grammar (compiled once for all choices, off the event loop) is added after."""
        # With n > 1, each choice gets its own seed so the choices differ but stay reproducible.
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias=tuple((int(t), b) for t, b in self.logit_bias.items()),
                              # a max_tokens the caller gave is at least min_tokens (refused otherwise); a default
                              # one is a ceiling the caller did not choose, and caps it
                              min_tokens=min(self.min_tokens, max_tokens), stop_token_ids=tuple(self.stop_token_ids))

    def grammar(self) -> str | None:
        """The llguidance grammar the output must follow (None when free), to compile once for all the choices."""
        return self.response_format.grammar() if self.response_format else None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="a prompt, or a batch of them")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="each choice's text begins with its prompt")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        prompts = value if isinstance(value, list) and value and isinstance(value[0], (str, list)) else [value]
        if len(prompts) > 64:
            raise ValueError(f"a batch of {len(prompts)} prompts; at most 64")
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty")
        return value

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: prompt logprobs are not served, so echo cannot be combined with logprobs")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt."""
        batch = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        return list(self.prompt) if batch else [self.prompt]


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JSONSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, value: str) -> str:
        # A template that takes tool calls gets the arguments parsed: they must parse here, not in the template.
        try:
            json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("the arguments are not JSON text") from None
        return value


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, earlier in the conversation
    tool_call_id: str | None = Field(None, validate_default=True)  # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        for i, part in enumerate(value if isinstance(value, list) else ()):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                # the part's type is not echoed: it is the caller's text, whatever it claims to be
                raise ValueError(f"part {i} is not a text part: this model reads text parts only")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a tool message answers a call: give the id of the assistant's call it answers")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    # a bound checked before any template runs or token is counted (a body of empty messages is cheap to send)
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    tools: list[ToolDef] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only with logprobs: true")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice: only with tools")
        names = [t.function.name for t in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError("tool_choice: the function it names is not among the tools")
        if self.tools and self.response_format and self.response_format.type != "text":
            raise ValueError("response_format: not with tools (a tool call has its own format)")
        if self.messages[-1].role == "assistant" and self.messages[-1].tool_calls:
            raise ValueError("messages: the last message is the assistant's tool calls; a tool message answering "
                             "each must follow")
        return self

    def given_max_tokens(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None:  # it wins over max_tokens, as in _sampling
            return "max_completion_tokens", self.max_completion_tokens
        return super().given_max_tokens()

    @property
    def continues_final_message(self) -> bool:
        """A conversation that ends with the assistant's message asks for that message's continuation (a prefill,
        as vLLM's continue_final_message), not for a second assistant turn after it."""
        return self.messages[-1].role == "assistant"

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class AdapterLoadRequest(_Strict):
    """POST /admin/adapters: load an addon of the deployment's account by its model name; the replica finds its
    adapter in the store. A path or URL is never taken from a request (`source` is refused by name)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="accounts/<the deployment's account>/models/<addon id>")
