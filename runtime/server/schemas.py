"""The OpenAI request bodies tsrun accepts, as pydantic models.

What it is: field names, JSON types, defaults and the bounds OpenAI documents for
/v1/chat/completions and /v1/completions, so all of them are in /openapi.json too. Types are
strict (`"temperature": "hot"` or `"max_tokens": 1.5` is a 400, not a silent coercion),
numbers finite (`NaN`, `Infinity`: 400) and strings valid Unicode (a JSON `"\\ud800"`
escape: 400). `null` means the default, as in OpenAI's spec. A field tsrun does not know is a
400 naming it, and so is an OpenAI field it does not implement (`UNSUPPORTED`: `audio`,
`functions`...) unless the value is the one that changes nothing
(`null`, `[]`, `"none"`...): a client never gets a parameter silently ignored. What it is
not: the checks that need the model or the server (vocabulary, context length, --max-n,
message roles), in validation.py.

    bound                 value       source
    n                     1..128      OpenAI (the server's max_n may be lower)
    temperature           0..2        OpenAI
    top_p                 (0, 1]      OpenAI (0 would sample nothing)
    presence/frequency    -2..2       OpenAI
    top_logprobs          0..20       OpenAI (completions' logprobs: the same engine cap)
    seed                  int64       OpenAI
    stop                  <= 4        OpenAI ("up to 4 sequences")
    len(stop string)      1..1024     ours: bounds the stop matcher's set-up
    stop_token_ids        <= 256      ours (vLLM extension): scanned per sampled token
    logit_bias            <= 1024     OpenAI (values -100..100; keys token ids as strings)
    user                  <= 256      ours: the engine keeps a session id while its prefix
                                      is pinned
    tools                 <= 128      OpenAI
    tool / schema name    [A-Za-z0-9_.-]{1,64}  OpenAI (plus dots)
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      StringConstraints, model_validator)

from tscompile.runtime.protocol import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

MAX_N = 128
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256
MAX_SESSION_ID_CHARS = 256
MAX_TOOLS = 128
INT64 = (-(1 << 63), (1 << 63) - 1)


def _valid_unicode(s: str) -> str:
    """JSON can spell a lone UTF-16 surrogate (`"\\ud800"`); no tokenizer can encode it."""
    try:
        s.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: lone surrogate U+{ord(s[e.start]):04X} at "
                         f"index {e.start}") from None
    return s


def _integral(v: Any) -> Any:
    """`26.0` is an integer in JSON Schema (and what some encoders write); `1.5` is not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[Int, Field(ge=0)]
Text = Annotated[str, AfterValidator(_valid_unicode)]
NonEmpty = Annotated[str, StringConstraints(min_length=1), AfterValidator(_valid_unicode)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS),
                 AfterValidator(_valid_unicode)]
SessionId = Annotated[str, StringConstraints(max_length=MAX_SESSION_ID_CHARS),
                      AfterValidator(_valid_unicode)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
# OpenAI: "a-z, A-Z, 0-9, or contain underscores and dashes, with a maximum length of 64"
# (dots too, which MCP tool names use).
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]

_FUNCTIONS = "the deprecated functions API; use tools"
_AUDIO = "tsrun serves text models"
_STORE = "tsrun stores nothing"

# OpenAI fields tsrun does not implement: name -> (values that change nothing and are
# accepted besides null, why not). One table for every body model; a model lists the names
# that are its own in `_unsupported`.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    # chat and completions
    "service_tier": (("auto", "default"), "there is one tier"),
    "prompt_cache_key": ((), "the session id (x-session-id header or `user`) keys the cache"),
    "safety_identifier": ((), "no abuse monitoring"),
    "store": ((False,), _STORE),
    "metadata": (({},), _STORE),
    # chat
    "functions": (([],), _FUNCTIONS),
    "function_call": (("none",), _FUNCTIONS),
    "audio": ((), _AUDIO),
    "modalities": ((["text"],), _AUDIO),
    "prediction": ((), "predicted outputs are not implemented"),
    "reasoning_effort": ((), "no reasoning models yet"),
    "verbosity": ((), "no reasoning models yet"),
    "web_search_options": ((), "no web search"),
    # completions
    "best_of": ((1,), "use n"),
    "echo": ((False,), "the prompt is not returned"),
    "suffix": ((), "no fill-in-the-middle"),
    # chat messages
    "refusal": ((), "assistant refusals are not rendered"),
    # stream_options
    "include_obfuscation": ((False,), "streams are not padded"),
}


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (`0` is not `false`)."""
    return type(a) is type(b) and a == b


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    _unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Drop `null`s (the default) and unsupported fields set to a no-op; whatever is
        left that is not a field fails as `extra_forbidden` (errors.py names it)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None and not (
            k in cls._unsupported and any(_same(v, ok) for ok in UNSUPPORTED[k][0]))}


class StrictBody(BaseModel):
    """The Anthropic and Responses bodies' base: strict types, unknown fields forbidden,
    `null` = the default, fields by name or alias (their unsupported fields are checked
    by those modules, not through UNSUPPORTED)."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                              populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None}


class StreamOptions(_Body):
    _unsupported = ("include_obfuscation",)
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by both routes. None means "the default" (SamplingParams')."""
    _unsupported = ("service_tier", "prompt_cache_key", "safety_identifier", "store",
                    "metadata")
    model: Text | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1)        # vLLM extension; -1 or 0 disables it
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    seed: Int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS)
    # OpenAI: {"token id": bias}; validation.py checks the keys against the vocabulary.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS)
    n: Int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The session id unless the header gives one.
    user: SessionId | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ContentPart(BaseModel):
    # extra="allow": an image or audio part carries its payload; validation.py rejects
    # every part type but text by name, and a text part's unknown fields.
    model_config = ConfigDict(strict=True, extra="allow")
    type: Text
    text: Text | None = None


class ToolCallFunction(_Body):
    name: NonEmpty
    arguments: Text                      # JSON text, as OpenAI sends it


class MessageToolCall(_Body):
    """A tool call of an earlier assistant turn, as the client sends it back."""
    id: NonEmpty
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    _unsupported = ("function_call", "audio", "refusal")
    # "function" (the deprecated functions API): validation.py says it is not supported.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None             # handed to the chat template
    tool_calls: list[MessageToolCall] | None = None      # assistant
    tool_call_id: Text | None = None                     # tool
    # An assistant turn's reasoning, re-rendered by templates that keep it (vLLM's names).
    reasoning_content: Text | None = None
    reasoning: Text | None = None


class FunctionDefinition(_Body):
    name: ToolName
    description: Text | None = None
    parameters: dict[str, Any] | None = None     # JSON Schema; validation.py checks it
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Body):
    name: NonEmpty


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class JSONSchemaFormat(_Body):
    name: ToolName
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: required when type is 'json_schema' and only then")
        return self


class ChatCompletionRequest(SamplingFields):
    _unsupported = SamplingFields._unsupported + (
        "functions", "function_call", "audio", "modalities", "prediction",
        "reasoning_effort", "verbosity", "web_search_options")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)   # max_tokens' newer name; wins
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # vLLM's extension: extra variables for the chat template (e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    _unsupported = SamplingFields._unsupported + ("best_of", "echo", "suffix")
    # One prompt (text or token ids) or a batch of them; choices are prompt-major.
    prompt: (NonEmpty | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[NonEmpty], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    # How many top logprobs; 0 = the sampled token's only.
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
