"""tsrun's HTTP front: an OpenAI-compatible FastAPI app over an `EngineClient`, with the
Anthropic Messages (anthropic_api.py) and OpenAI Responses (responses_api.py) routes beside.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming SSE or whole), POST
/v1/messages (+ /count_tokens), POST /v1/responses (+ GET/DELETE by id), GET /v1/models, GET
/health (503 while the engine is not ready or dead), GET /metrics.

Per request: read the body (body_limit.py: 413 over the size limit, 400 not UTF-8) ->
validate (schemas.py, validation.py: 400 with OpenAI's error JSON naming the field; 401 bad
API key; 404 unknown model; 503 engine down or server shutting down) -> the chat pipeline
every chat-shaped API shares (`chat_generation`: chat.py checks the turn's tools, renders the
chat template with them off the event loop and compiles the grammar of `response_format` /
a forced tool call; the model family's parser reads reasoning and tool calls back out of
the token ids) -> fan out n samples per prompt as engine requests `{id}-{choice}` (sample i
gets seed+i) -> merge the choices' deltas (serving.py) into chunks or one body
(responses.py). A client that goes away mid-request (stream or not) aborts its engine
requests. Shutdown (`drain`, called by shutdown.py) refuses new requests, gives those in
flight a grace period, then ends each with an error: a response is never cut off silently.

What it is not: the engine, the CLI that wires the processes together, a model family's
output format (parsers/).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tscompile.runtime.grammar import GrammarCompiler
from tscompile.runtime.protocol import AddRequest, GrammarSpec, SamplingParams
from tscompile.runtime.server import anthropic_api, chat, responses_api
from tscompile.runtime.server import responses as R
from tscompile.runtime.server import validation as V
from tscompile.runtime.server.chat import ChatTurn
from tscompile.runtime.server.body_limit import MAX_BODY_BYTES, BodyLimit
from tscompile.runtime.server.detokenizer import TokenTable
from tscompile.runtime.server.engine_client import EngineClient
from tscompile.runtime.server.errors import (APIError, from_value_error,
                                             install_error_handlers, short)
from tscompile.runtime.server.metrics import Metrics
from tscompile.runtime.server.parsers import FAMILIES, make_parser
from tscompile.runtime.server.parsers.base import OutputParser
from tscompile.runtime.server.schemas import (MAX_N, ChatCompletionRequest, CompletionRequest,
                                              SamplingFields)
from tscompile.runtime.server.serving import ChoiceSpec, Generation

SHUTTING_DOWN = "server is shutting down"
DECODE_FLOOR_HEADER = "x-decode-floor"
MAX_DECODE_FLOOR = 10000.0           # tokens/s: beyond any card's decode speed


def create_app(client: EngineClient, tokenizer: Any, *, model_name: str, max_model_len: int,
               api_key: str | None = None, max_n: int = 8,
               session_id_header: str = "x-session-id",
               max_body_bytes: int = MAX_BODY_BYTES,
               tool_parser: str | None = None, decode_floor: bool = False) -> FastAPI:
    """`session_id_header`: the request header carrying the session id (it wins over the
    body's `user`); the engine keeps a session's prefix cached between turns.
    `tool_parser`: the model family whose tool-call and reasoning format the output is
    parsed with (parsers.FAMILIES; None: no tool calls). `decode_floor`: the engine has a
    step-time model, so requests may carry an `x-decode-floor` header."""
    server = OpenAIServer(client, tokenizer, model_name=model_name,
                          max_model_len=max_model_len, max_n=max_n,
                          session_header=session_id_header, tool_parser=tool_parser,
                          decode_floor=decode_floor)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            client.close()

    app = FastAPI(title="tsrun", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    install_error_handlers(app)

    def check_api_key(request: Request) -> None:
        """`Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else \
            request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid API key: send it as 'Authorization: Bearer <key>' "
                                "or 'x-api-key: <key>'", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)] if api_key else [])
    v1.add_api_route("/chat/completions", server.chat, methods=["POST"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/models", server.models, methods=["GET"])
    anthropic_api.add_routes(v1, server)
    responses_api.add_routes(v1, server)
    app.include_router(v1)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_endpoint, methods=["GET"])
    return app


class OpenAIServer:
    def __init__(self, client: EngineClient, tokenizer: Any, *, model_name: str,
                 max_model_len: int, max_n: int, session_header: str,
                 tool_parser: str | None = None, decode_floor: bool = False):
        if max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {max_model_len}")
        if not 1 <= max_n <= MAX_N:
            raise ValueError(f"max_n: must be in [1, {MAX_N}] (OpenAI's cap), got {max_n}")
        self.client = client
        self.tokenizer = tokenizer
        self.token_table = TokenTable(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_n = max_n
        self.session_header = session_header
        self.floors = decode_floor           # the engine keeps per-request decode floors
        if tool_parser is not None and tool_parser not in FAMILIES:
            raise ValueError(f"tool_parser: must be one of {', '.join(FAMILIES)}, "
                             f"got {tool_parser!r}")
        self.family = tool_parser
        self._grammars: GrammarCompiler | None = None
        self.metrics = Metrics(client)
        self.created = int(time.time())
        self.draining = False

    @property
    def vocab_size(self) -> int:
        return self.client.ready.vocab_size if self.client.ready else self.tokenizer.vocab_size

    # ------------------------------------------------------------------ shutdown

    def drain(self, grace_s: float) -> None:
        """Shutdown began: new requests get 503; those in flight have `grace_s` seconds to
        finish, then each ends with an error (a stream: an error event, then [DONE])."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(grace_s, self.end_in_flight)

    def end_in_flight(self) -> None:
        """End every request in flight now with a 503-style error."""
        self.draining = True
        self.client.fail_pending(SHUTTING_DOWN)

    # ------------------------------------------------------------------ small routes

    async def health(self) -> JSONResponse:
        if self.draining:
            return JSONResponse({"status": "unavailable", "reason": SHUTTING_DOWN},
                                status_code=503)
        if self.client.healthy:
            return JSONResponse({"status": "ok"})
        why = self.client.dead_reason or "engine is not ready yet"
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": self.created,
                          "owned_by": "tscompile", "max_model_len": self.max_model_len}]}

    # ------------------------------------------------------------------ generation routes

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        arrival = time.monotonic()
        self._check_common(body)
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = getattr(body, max_field)
        params = self._params(body, max_tokens, logprobs=body.logprobs,
                              top_logprobs=body.top_logprobs or 0)
        fmt = body.response_format
        if body.tool_choice not in (None, "none") and not body.tools:
            raise APIError(400, "tool_choice: only allowed when tools are given",
                           param="tool_choice")
        turn = ChatTurn(
            V.template_messages(body.messages),
            tools=[t.model_dump(exclude_none=True) for t in body.tools or ()],
            tool_choice=(body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel)
                         else body.tool_choice or ("auto" if body.tools else "none")),
            parallel_tool_calls=body.parallel_tool_calls,
            json_schema=fmt.json_schema.schema_ if fmt and fmt.json_schema else None,
            json_object=bool(fmt and fmt.type == "json_object"),
            template_kwargs=body.chat_template_kwargs or {})
        meta = R.ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()),
                              self.model_name, params.top_logprobs)
        session = V.session_id(self.session_header, request.headers.get(self.session_header),
                               body.user)
        gen = await self.chat_generation(
            meta.id, turn, params, n=body.n, seed=body.seed, stops=body.stops,
            max_tokens=max_tokens, max_field=max_field, session=session, arrival=arrival,
            floor=self.decode_floor(request),
            fields=lambda f: "function.parameters" if f == "parameters" else f)
        if body.stream:
            return self._streaming(self._chat_stream(gen, meta, body.n, body))
        choices = await self._collect(gen, request, body.n)
        return R.chat_body(meta, self.token_table, choices, gen.usage().as_dict(),
                           body.logprobs)

    async def chat_generation(self, rid: str, turn: ChatTurn, params: SamplingParams, *,
                              n: int, seed: int | None, stops: tuple[str, ...],
                              max_tokens: int | None, max_field: str, session: str | None,
                              arrival: float, floor: float = 0.0,
                              fields: Callable[[str], str] = lambda f: f) -> Generation:
        """The request pipeline every chat-shaped API shares (OpenAI chat, Anthropic
        Messages, OpenAI Responses): check the turn, render it, compile its grammar, and
        fan it out into `n` engine requests whose output the family's parser reads.
        `fields` renames fields in error messages to the calling API's names."""
        chat.check_turn(turn, fields=fields)
        if turn.parse_tools and self.family is None:
            raise APIError(400, f"{fields('tools')}: this server reads no tool calls for this "
                                f"model (start tsrun with --tool-call-parser)",
                           param=fields("tools"))
        prompt_ids = await run_in_threadpool(self._render_chat, turn)
        spec = chat.grammar_for(turn, self.family)
        if spec is not None:
            await run_in_threadpool(self._check_grammar, spec, turn, fields)
            params = dataclasses.replace(params, grammar=spec)
        schemas = turn.tool_schemas()
        family, tools = self.family, turn.parse_tools

        def parser(ids: Sequence[int]) -> OutputParser:
            return make_parser(family, self.tokenizer, ids, tools=tools, reasoning=True,
                               tool_schemas=schemas)
        specs = self._specs(rid, params, [prompt_ids], n=n, seed=seed, stops=stops,
                            max_tokens=max_tokens, max_field=max_field,
                            prompt_field=fields("messages"), session=session,
                            arrival=arrival, floor=floor, parser=parser)
        return Generation(self.client, self.tokenizer, self.metrics, specs)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        arrival = time.monotonic()
        self._check_common(body)
        want_lp = body.logprobs is not None
        params = self._params(body, body.max_tokens, logprobs=want_lp,
                              top_logprobs=body.logprobs or 0)
        prompts = await run_in_threadpool(self._tokenize_prompts, body.prompt)
        meta = R.ResponseMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name,
                              params.top_logprobs)
        session = V.session_id(self.session_header, request.headers.get(self.session_header),
                               body.user)
        specs = self._specs(meta.id, params, prompts, n=body.n, seed=body.seed,
                            stops=body.stops, max_tokens=body.max_tokens,
                            max_field="max_tokens", prompt_field="prompt", session=session,
                            arrival=arrival, floor=self.decode_floor(request))
        gen = Generation(self.client, self.tokenizer, self.metrics, specs)
        if body.stream:
            return self._streaming(self._completion_stream(gen, meta, body, want_lp))
        choices = await self._collect(gen, request, len(specs))
        return R.completion_body(meta, self.token_table, choices, gen.usage().as_dict(),
                                 want_lp)

    # ------------------------------------------------------------------ validation

    def _check_common(self, body: SamplingFields) -> None:
        self.check_model(body.model)
        V.check_sampling(body, vocab_size=self.vocab_size, max_n=self.max_n)
        self.check_ready()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model: {short(model)} does not exist; this server "
                                f"serves {self.model_name!r} (see /v1/models)",
                           param="model", code="model_not_found")

    def check_ready(self) -> None:
        """503 while shutting down or while the engine is not serving."""
        if self.draining:
            raise APIError(503, SHUTTING_DOWN, type="server_error", code=503)
        if not self.client.healthy:
            raise APIError(503, f"engine unavailable: "
                                f"{self.client.dead_reason or 'not ready yet'}",
                           type="server_error", code=503)

    def _params(self, body: SamplingFields, max_tokens: int | None, *,
                logprobs: bool, top_logprobs: int) -> SamplingParams:
        """SamplingParams with everything but the final max_tokens and seed (the schema
        bounds every field already; what SamplingParams adds, e.g. top_logprobs without
        logprobs, it names as `field: why, got X`)."""
        given = {k: getattr(body, k) for k in (
            "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed") if getattr(body, k) is not None}
        if body.top_k is not None:
            given["top_k"] = 0 if body.top_k == -1 else body.top_k   # vLLM's "off"
        try:
            return SamplingParams(
                max_tokens=1 if max_tokens is None else max_tokens,
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                logprobs=logprobs, top_logprobs=top_logprobs,
                logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
                **given)
        except ValueError as e:
            raise from_value_error(e) from None

    def _render_chat(self, turn: ChatTurn) -> list[int]:
        return self.tokenizer.encode(chat.render(self.tokenizer, turn, self.family))

    def _check_grammar(self, spec: GrammarSpec, turn: ChatTurn,
                       fields: Callable[[str], str]) -> None:
        """The grammar compiles for this vocabulary (xgrammar's compiler, cached), or a 400
        naming the field it came from."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, vocab_size=self.vocab_size,
                                             stop_token_ids=self.tokenizer.eos_token_ids)
        try:
            self._grammars.check(spec)
        except ValueError as e:
            field = fields("response_format") if spec.kind.startswith("json") \
                else fields("tools")
            raise APIError(400, f"{field}: cannot be compiled into a grammar: {e}",
                           param=field) from None

    def _tokenize_prompts(self, prompt: str | list[Any]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        vocab = self.vocab_size
        out = []
        for p in prompt:
            ids = self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) \
                else list(p)
            if bad := [t for t in ids if not 0 <= t < vocab]:
                raise APIError(400, f"prompt: token ids must be in [0, {vocab}), got {bad[0]}",
                               param="prompt")
            out.append(ids)
        return out

    def _specs(self, rid: str, params: SamplingParams, prompts: Sequence[list[int]], *,
               n: int, seed: int | None, stops: tuple[str, ...], max_tokens: int | None,
               max_field: str, prompt_field: str, session: str | None, arrival: float,
               floor: float = 0.0,
               parser: Callable[[Sequence[int]], OutputParser] | None = None
               ) -> list[ChoiceSpec]:
        specs = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"{prompt_field}: must not be empty", param=prompt_field)
            room = self.max_model_len - len(ids)
            if max_tokens is not None and max_tokens > room:
                raise self._too_long(len(ids), max_tokens, max_field)
            if room < 1:
                raise self._too_long(len(ids), None, prompt_field)
            p_params = dataclasses.replace(
                params, max_tokens=room if max_tokens is None else max_tokens)
            for i in range(n):
                index = p * n + i
                specs.append(ChoiceSpec(
                    index, p, AddRequest(f"{rid}-{index}", tuple(ids),
                                         dataclasses.replace(
                                             p_params, seed=None if seed is None else seed + i),
                                         session_id=session, arrival=arrival,
                                         decode_floor_tps=floor),
                    stops, parser))
        return specs

    def _too_long(self, n_prompt: int, n_out: int | None, param: str) -> APIError:
        if n_out is None:
            why = (f"the prompt is {n_prompt} tokens, which leaves no room to generate; "
                   f"shorten the prompt")
        else:
            why = (f"you requested {n_prompt + n_out} ({n_prompt} in the prompt, {n_out} for "
                   f"the completion); shorten the prompt or lower {param}")
        return APIError(400, f"{param}: this model's maximum context length is "
                             f"{self.max_model_len} tokens, but {why}",
                        param=param, code="context_length_exceeded")

    # ------------------------------------------------------------------ running

    def decode_floor(self, request: Request) -> float:
        """The request's `x-decode-floor` header (tokens/s it keeps while decoding), 0 when
        absent; 400 when malformed or when the engine keeps no floors."""
        raw = request.headers.get(DECODE_FLOOR_HEADER)
        if raw is None:
            return 0.0
        try:
            v = float(raw)
        except ValueError:
            v = float("nan")
        if not 0 < v <= MAX_DECODE_FLOOR:
            raise APIError(400, f"{DECODE_FLOOR_HEADER} header: must be a decode speed in "
                                f"tokens/s in (0, {MAX_DECODE_FLOOR:g}], got {raw!r}")
        if not self.floors:
            raise APIError(400, f"{DECODE_FLOOR_HEADER} header: this server keeps no decode "
                                f"floors (start tsrun with --decode-floor-tps, "
                                f"--step-time-model or --profile-step-time)")
        return v

    def _engine_error(self, why: str | None) -> APIError:
        status = 500 if self.client.healthy and not self.draining else 503
        return APIError(status, f"generation failed: {why or 'engine error'}",
                        type="server_error", code=status)

    async def _collect(self, gen: Generation, request: Request,
                       n: int) -> list[R.ChoiceResult]:
        """Run to the end, unless the client disconnects first (then abort)."""
        async def run() -> list[R.ChoiceResult]:
            results = [R.ChoiceResult() for _ in range(n)]
            async with contextlib.aclosing(gen.stream()) as deltas:
                async for d in deltas:
                    if d.finish_reason == "error":
                        raise self._engine_error(d.error)
                    results[d.index].add(d)
            return results

        work = asyncio.create_task(run())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            raise APIError(499, "client closed the request", type="client_closed")
        finally:
            work.cancel()
            gone.cancel()

    @staticmethod
    def _streaming(chunks: AsyncIterator[str]) -> StreamingResponse:
        return _SSEResponse(chunks, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})

    async def _deltas(self, gen: Generation) -> AsyncIterator[Any]:
        """gen.stream() with failures turned into one error event (the status line is sent
        already, so errors travel in the stream, as OpenAI does)."""
        try:
            async with contextlib.aclosing(gen.stream()) as deltas:
                async for d in deltas:
                    if d.finish_reason == "error":
                        yield self._engine_error(d.error)
                        return
                    yield d
        except Exception as e:       # noqa: BLE001 - must end the stream cleanly
            yield self._engine_error(f"{type(e).__name__}: {e}")

    def _chat_stream(self, gen: Generation, meta: R.ResponseMeta, n: int,
                     body: ChatCompletionRequest) -> AsyncIterator[str]:
        usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(d: Any) -> dict[str, Any]:
            lp = (R.chat_logprobs(self.token_table, d.logprobs, meta.top_logprobs)
                  if body.logprobs and d.logprobs else None)
            return R.chat_chunk(meta, d.index, R.chat_delta(d), logprobs=lp,
                                finish_reason=d.finish_reason, include_usage=usage)
        head = [R.chat_chunk(meta, i, {"role": "assistant", "content": ""},
                             include_usage=usage) for i in range(n)]
        return self._sse(gen, meta, usage, "chat.completion.chunk", head, chunk)

    def _completion_stream(self, gen: Generation, meta: R.ResponseMeta,
                           body: CompletionRequest, want_lp: bool) -> AsyncIterator[str]:
        usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(d: Any) -> dict[str, Any]:
            lp = (R.completion_logprobs(self.token_table, d.logprobs, meta.top_logprobs)
                  if want_lp and d.logprobs else None)
            return R.completion_chunk(meta, d.index, d.text, logprobs=lp,
                                      finish_reason=d.finish_reason, include_usage=usage)
        return self._sse(gen, meta, usage, "text_completion", [], chunk)

    async def _sse(self, gen: Generation, meta: R.ResponseMeta, usage: bool, kind: str,
                   head: list[dict[str, Any]], chunk: Any) -> AsyncIterator[str]:
        """The SSE stream of either endpoint: `head` chunks, then one `chunk(delta)` per
        delta that carries anything (an engine error ends the stream with its error body),
        the usage chunk if asked for, and [DONE]."""
        for c in head:
            yield R.sse(c)
        async with contextlib.aclosing(self._deltas(gen)) as deltas:
            async for d in deltas:
                if isinstance(d, APIError):
                    yield R.sse(d.body())
                    yield R.DONE
                    return
                if d.text or d.logprobs or d.finish_reason or d.reasoning or d.tool_calls:
                    yield R.sse(chunk(d))
        if usage:
            yield R.sse(R.usage_chunk(meta, kind, gen.usage().as_dict()))
        yield R.DONE


class _SSEResponse(StreamingResponse):
    """Closes the chunk generator when the response ends however it ends. Starlette
    cancels the stream when the client disconnects; if that happens while the generator
    waits at a `yield` (inside `send`), only this aclose() runs its cleanup (aborting the
    engine requests) now rather than whenever the generator is garbage collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next ASGI
    message can only be http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
