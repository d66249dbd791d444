"""The aiohttp application: OpenAI's Chat Completions wire format, limits, faults, stats.

The hot path is kept short (the simulator must never be the bottleneck of a
benchmark): one ``json.loads``, one hash, an LRU of generated answers, one
``json.dumps``, no access log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from dask_llm.simulator import _answers as answers
from dask_llm.simulator._config import SimulatorConfig
from dask_llm.simulator._limits import SlidingWindow, duration
from dask_llm.simulator._stats import Stats

_JSON = "application/json"
_CACHE_SIZE = 20_000
_SERVER_ERRORS = {
    "error_500": (
        500,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "error_503": (503, "The engine is currently overloaded, please try again later."),
}


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type=_JSON, headers=headers
    )


def count_tokens(payload: dict[str, Any]) -> int:
    """Prompt tokens, by the usual heuristic: ~4 characters a token, 3 per message, 3 to prime."""
    chars = 0
    messages = payload.get("messages") or []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    for extra in ("tools", "response_format"):
        if payload.get(extra):
            chars += len(json.dumps(payload[extra]))
    return 3 + 3 * len(messages) + math.ceil(chars / 4)


class SimulatorApp:
    """State and handlers of one simulated provider."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._faults = random.Random(config.seed)
        self._answers: OrderedDict[bytes, tuple[dict[str, Any], int, bool]] = OrderedDict()
        self._requests = SlidingWindow(config.rpm, config.limit_window) if config.rpm else None
        self._tokens = SlidingWindow(config.tpm, config.limit_window) if config.tpm else None
        self._seed = str(config.seed).encode()

    def reset(self) -> None:
        self.stats.reset()
        self._faults = random.Random(self.config.seed)
        for window in (self._requests, self._tokens):
            if window is not None:
                window.clear()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/sim/stats", self.get_stats)
        app.router.add_post("/sim/reset", self.post_reset)
        return app

    # -- small endpoints ----------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        names = self.config.models or ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini")
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "dask-llm-simulator"}
            for n in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # -- headers ------------------------------------------------------------------------
    def _limit_headers(self, now: float) -> dict[str, str]:
        headers = {"x-request-id": f"req_{uuid.uuid4().hex[:24]}", "openai-processing-ms": "1"}
        for kind, window in (("requests", self._requests), ("tokens", self._tokens)):
            if window is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(window.per_minute)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining(now))
            headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_after(now))
        return headers

    # -- the endpoint -------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        now = time.monotonic()
        stats.started(now)
        try:
            return await self._chat(request, now)
        finally:
            stats.finished()

    async def _chat(self, request: web.Request, now: float) -> web.StreamResponse:
        cfg = self.config
        stats = self.stats
        if cfg.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {cfg.api_key}":
                stats.faults["unauthorized"] += 1
                return _error(
                    401,
                    "Incorrect API key provided. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    type_="invalid_request_error",
                    code="invalid_api_key",
                )
        raw = await request.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            stats.faults["bad_request"] += 1
            return _error(
                400,
                "We could not parse the JSON body of your request. (HINT: This "
                "likely means you aren't using your HTTP library correctly. The OpenAI "
                "API expects a JSON payload, but what was sent was not valid JSON.)",
                type_="invalid_request_error",
            )
        problem = self._validate(payload)
        if problem is not None:
            return problem
        model = payload["model"]
        prompt_tokens = count_tokens(payload)
        if cfg.context_tokens is not None and prompt_tokens > cfg.context_tokens:
            stats.faults["context_length_exceeded"] += 1
            return _error(
                400,
                f"This model's maximum context length is {cfg.context_tokens} "
                f"tokens. However, your messages resulted in {prompt_tokens} tokens. "
                "Please reduce the length of the messages.",
                type_="invalid_request_error",
                param="messages",
                code="context_length_exceeded",
            )

        # Limits, checked on arrival as the provider does.
        if cfg.max_in_flight is not None and stats.in_flight > cfg.max_in_flight:
            return self._too_many(now, 1.0, "requests", "Too many concurrent requests.")
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if self._requests is not None:
            wait = self._requests.try_take(now, 1)
            if wait:
                return self._too_many(
                    now,
                    wait,
                    "requests",
                    f"Rate limit reached for {model} on requests per min (RPM): Limit {cfg.rpm}.",
                )
        if self._tokens is not None:
            cost = prompt_tokens + int(max_tokens or cfg.completion_tokens)
            wait = self._tokens.try_take(now, cost)
            if wait:
                return self._too_many(
                    now,
                    wait,
                    "tokens",
                    f"Rate limit reached for {model} on tokens per min (TPM): "
                    f"Limit {cfg.tpm}, Requested {cost}.",
                )

        digest = hashlib.blake2b(raw, key=self._seed[:64], digest_size=16).digest()
        cached = self._answers.get(digest)
        if cached is None:
            cached = self._compose(payload, digest, max_tokens)
            self._answers[digest] = cached
            if len(self._answers) > _CACHE_SIZE:
                self._answers.popitem(last=False)
        else:
            self._answers.move_to_end(digest)
        body, completion_tokens, structured = cached

        # Faults: one uniform draw, split into bands (each band's width is its probability).
        draw = self._faults.random()
        fault = None
        edge = 0.0
        for name, p in (
            ("connection_reset", cfg.connection_reset),
            ("hang", cfg.hang),
            ("error_500", cfg.error_rate),
            ("error_503", cfg.error_503),
            ("malformed_json", cfg.malformed_json),
            ("schema_violation", cfg.schema_violation if structured else 0.0),
        ):
            edge += p
            if draw < edge:
                fault = name
                break

        delay = self._latency(digest, completion_tokens)
        if fault is not None:
            stats.faults[fault] += 1  # counted on arrival: a hang never gets further
        if fault == "hang":
            await asyncio.sleep(cfg.hang_seconds)
        if delay > 0:
            await asyncio.sleep(delay)
        headers = self._limit_headers(time.monotonic())
        if fault == "connection_reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault in _SERVER_ERRORS:
            status, message = _SERVER_ERRORS[fault]
            return _error(status, message, type_="server_error", headers=headers)
        if fault == "malformed_json":
            broken = json.dumps(body)[:40]
            return web.Response(body=broken.encode(), content_type=_JSON, headers=headers)
        if fault == "schema_violation":
            body = self._violated(payload, body)

        stats.answered(digest, model, prompt_tokens, completion_tokens)
        full = dict(body)
        full["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if payload.get("stream"):
            return await self._stream(request, full, headers, payload)
        return web.Response(
            body=json.dumps(full, separators=(",", ":")).encode(),
            content_type=_JSON,
            headers=headers,
        )

    def _validate(self, payload: Any) -> web.Response | None:
        def bad(message: str, param: str | None, code: str | None = None) -> web.Response:
            self.stats.faults["bad_request"] += 1
            return _error(400, message, type_="invalid_request_error", param=param, code=code)

        if not isinstance(payload, dict):
            return bad("Invalid type for request body: expected an object.", None)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return bad("you must provide a model parameter", "model", "missing_required_parameter")
        messages = payload.get("messages")
        if messages is None:
            return bad(
                "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
            )
        if not isinstance(messages, list) or not messages:
            return bad(
                "Invalid 'messages': expected a non-empty array.", "messages", "invalid_type"
            )
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                return bad(
                    f"Missing required parameter: 'messages[{k}].role'.",
                    f"messages[{k}].role",
                    "missing_required_parameter",
                )
        n = payload.get("n", 1)
        if n not in (None, 1):
            return bad("The simulator answers n=1 only.", "n", "invalid_value")
        if self.config.models is not None and model not in self.config.models:
            self.stats.faults["model_not_found"] += 1
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                type_="invalid_request_error",
                code="model_not_found",
            )
        return None

    def _too_many(self, now: float, wait: float, kind: str, message: str) -> web.Response:
        self.stats.rate_limited += 1
        headers = self._limit_headers(now)
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(1, round(wait * 1000)))
        return _error(
            429,
            message + " Please try again in " + duration(wait) + ".",
            type_=kind,
            code="rate_limit_exceeded",
            headers=headers,
        )

    def _latency(self, digest: bytes, completion_tokens: int) -> float:
        cfg = self.config
        if cfg.latency <= 0 and cfg.per_token_latency <= 0:
            return 0.0
        base = cfg.latency
        if cfg.jitter > 0 and base > 0:
            rng = random.Random(digest + b"latency")
            base *= math.exp(rng.gauss(0.0, cfg.jitter))
        return base + cfg.per_token_latency * completion_tokens

    # -- answers ------------------------------------------------------------------------
    def _compose(
        self, payload: dict[str, Any], digest: bytes, max_tokens: int | None
    ) -> tuple[dict[str, Any], int, bool]:
        rng = random.Random(digest)
        last = payload["messages"][-1]
        content = last.get("content") if isinstance(last, dict) else ""
        text = content if isinstance(content, str) else json.dumps(content)
        echo = answers.prompt_words(text)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        finish = "stop"
        structured = False
        tools = payload.get("tools") or []
        choice = payload.get("tool_choice")
        response_format = payload.get("response_format") or {}
        if tools and choice != "none":
            tool = tools[0]
            if isinstance(choice, dict):
                wanted = (choice.get("function") or {}).get("name")
                tool = next((t for t in tools if t.get("function", {}).get("name") == wanted), tool)
            fn = tool.get("function", {})
            args = answers.schema_instance(fn.get("parameters") or {}, rng, echo)
            arguments = json.dumps(args)
            message["tool_calls"] = [
                {
                    "id": f"call_{digest.hex()[:24]}",
                    "type": "function",
                    "function": {"name": fn.get("name", "tool"), "arguments": arguments},
                }
            ]
            finish = "tool_calls"
            produced = arguments
            structured = True
        elif response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            produced = json.dumps(answers.schema_instance(schema, rng, echo))
            message["content"] = produced
            structured = True
        elif response_format.get("type") == "json_object" or "json" in text.lower():
            produced = answers.json_object(rng, echo)
            message["content"] = produced
        else:
            produced = answers.text_answer(rng, echo, self.config.completion_tokens)
            message["content"] = produced
        completion_tokens = max(1, math.ceil(len(produced) / 4))
        if max_tokens is not None and completion_tokens > int(max_tokens):
            cut = int(max_tokens) * 4
            if message.get("tool_calls"):
                message["tool_calls"][0]["function"]["arguments"] = produced[:cut]
            else:
                message["content"] = produced[:cut]
            completion_tokens = int(max_tokens)
            finish = "length"
        body = {
            "id": f"chatcmpl-{digest.hex()[:29]}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": payload["model"],
            "system_fingerprint": "fp_dask_llm_sim",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
        }
        return body, completion_tokens, structured

    def _violated(self, payload: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(json.dumps(body))
        message = body["choices"][0]["message"]
        if message.get("tool_calls"):
            fn = message["tool_calls"][0]["function"]
            schema = next(
                (
                    t["function"].get("parameters") or {}
                    for t in payload["tools"]
                    if t["function"].get("name") == fn["name"]
                ),
                {},
            )
            fn["arguments"] = json.dumps(answers.violate(json.loads(fn["arguments"]), schema))
        else:
            schema = ((payload.get("response_format") or {}).get("json_schema") or {}).get(
                "schema"
            ) or {}
            message["content"] = json.dumps(answers.violate(json.loads(message["content"]), schema))
        return body

    async def _stream(
        self,
        request: web.Request,
        full: dict[str, Any],
        headers: dict[str, str],
        payload: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        choice = full["choices"][0]
        base = {k: full[k] for k in ("id", "created", "model", "system_fingerprint")}
        base["object"] = "chat.completion.chunk"
        delta = {k: v for k, v in choice["message"].items() if v is not None and k != "refusal"}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": 0, **tc} for tc in delta["tool_calls"]]
        chunks = [
            {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
            },
        ]
        if (payload.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": full["usage"]})
        for chunk in chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
