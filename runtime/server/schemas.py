"""The OpenAI request bodies tsrun accepts, as pydantic models.

What it is: field names, JSON types and defaults of /v1/chat/completions and
/v1/completions (strict types: `"temperature": "hot"` or `"max_tokens": 1.5` is a 400, not a
silent coercion). What it is not: value checks (ranges, context length), which live in
SamplingParams.__post_init__ and openai_api.py so every message names its field the same way.
Unknown fields are ignored, as vLLM does (clients send `tools`, `parallel_tool_calls`...).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by both routes. None means "the default" (SamplingParams')."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None             # vLLM extension; -1 or 0 disables it
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None              # the session id unless the header gives one


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # extra="allow": tool_calls, tool_call_id, name... reach the chat template untouched.
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self, where: str) -> dict[str, Any]:
        """The dict a chat template expects; list content is joined text parts."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    raise ValueError(f"{where}.content[{j}]: only text parts are supported, "
                                     f"got type {part.type!r}")
                texts.append(part.text)
            msg["content"] = "\n".join(texts)
        return msg


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None     # the newer name of max_tokens; wins
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    # One prompt (text or token ids) or a batch of them; choices are prompt-major.
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None                  # how many top logprobs; 0 = sampled only
    echo: bool = False
