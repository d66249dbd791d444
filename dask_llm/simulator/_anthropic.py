"""Anthropic's Messages API (``POST /v1/messages``), as ``ChatAnthropic`` and the SDK use it.

The same answers as the Chat Completions endpoint (``_answers``: text that
echoes the prompt, JSON following a schema), in Anthropic's shapes: content
blocks, ``tool_use`` blocks whose ``input`` follows the tool's
``input_schema`` (how ``with_structured_output`` works on Claude), and a
``usage`` with ``cache_creation_input_tokens`` / ``cache_read_input_tokens``.

Limits the way Anthropic enforces them: requests, input tokens and output
tokens per minute, each a token bucket refilled continuously and holding
``limit_window`` seconds of the minute's limit (Anthropic "may enforce a
minute's limit over shorter spans"); every answer carries the
``anthropic-ratelimit-*`` headers (limit, remaining, reset as an RFC 3339
time) and a 429 carries ``retry-after``. A request's input tokens are charged
on arrival; its ``max_tokens`` is taken from the output bucket on arrival and
what its answer did not use is put back when the answer is sent (Anthropic
estimates output by ``max_tokens`` at the start and adjusts at the end).
``overloaded`` answers that share of requests with 529 ``overloaded_error``
(no quota used).

Prompt caching, explicit as Anthropic's: a request with a ``cache_control``
block caches its prefix up to the last such block (tools, system, then
messages); the first request of a prefix reports it as
``cache_creation_input_tokens``, the later ones within ``prompt_cache_ttl``
as ``cache_read_input_tokens``; ``input_tokens`` is what is left. Anthropic
caches prefixes of 1,024 tokens or more, and so does the simulator.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import math
import random
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from dask_llm.simulator import _answers as answers
from dask_llm.simulator._http import JSON
from dask_llm.simulator._limits import TokenBucket

if TYPE_CHECKING:
    from dask_llm.simulator._app import SimulatorApp

#: The smallest prefix Anthropic caches, in tokens.
MIN_CACHED_PREFIX: Final = 1024

_encode = json.JSONEncoder(separators=(",", ":")).encode
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def error_body(kind: str, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def count_tokens(payload: dict[str, Any]) -> int:
    """Input tokens, by the usual heuristic (~4 characters a token, 3 per message)."""
    messages = payload.get("messages") or []
    chars = len(_text_of(payload.get("system")))
    for m in messages:
        chars += len(_text_of(m.get("content") if isinstance(m, dict) else None))
    if payload.get("tools"):
        chars += len(json.dumps(payload["tools"]))
    return 3 + 3 * len(messages) + math.ceil(chars / 4)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif block.get("type") == "tool_use":
                    parts.append(json.dumps(block.get("input")))
                elif "content" in block:
                    parts.append(_text_of(block["content"]))
        return "\n".join(parts)
    return ""


def cached_prefix(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The part of a request up to its last ``cache_control`` block (None: none asked)."""
    prefix: dict[str, Any] = {}
    found = False
    tools = payload.get("tools") or []
    for k, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("cache_control"):
            prefix = {"tools": tools[: k + 1]}
            found = True
    system = payload.get("system")
    if isinstance(system, list):
        for k, block in enumerate(system):
            if isinstance(block, dict) and block.get("cache_control"):
                prefix = {"tools": tools, "system": system[: k + 1]}
                found = True
    messages = payload.get("messages") or []
    for k, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(b, dict) and b.get("cache_control") for b in content
        ):
            prefix = {"tools": tools, "system": system, "messages": messages[: k + 1]}
            found = True
    return prefix if found else None


def _is_tool_result(message: Any) -> bool:
    """Whether a message gives back a tool's result (a user turn of ``tool_result`` blocks)."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


def rfc3339(seconds_from_now: float) -> str:
    """The UTC time ``seconds_from_now``, as Anthropic's ``*-reset`` headers give it."""
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


class MessagesAPI:
    """``POST /v1/messages`` of one simulated provider (``SimulatorApp`` holds the config)."""

    def __init__(self, app: SimulatorApp) -> None:
        self.app = app
        self._draws = random.Random(f"{app.config.seed}-claude")
        self._cache: dict[bytes, float] = {}  # prefix digest -> when it was last used
        self.make_limiters()

    def make_limiters(self) -> None:
        cfg = self.app.config
        window = cfg.limit_window
        self._limiters: tuple[tuple[str, TokenBucket], ...] = tuple(
            (kind, TokenBucket(per_minute, window))
            for kind, per_minute in (
                ("requests", cfg.rpm),
                ("input-tokens", cfg.tpm),
                ("output-tokens", cfg.output_tpm),
            )
            if per_minute
        )

    def reset(self) -> None:
        self._draws = random.Random(f"{self.app.config.seed}-claude")
        self._cache.clear()
        for _, limiter in self._limiters:
            limiter.clear()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self.messages)

    # -- answers ------------------------------------------------------------------------
    def problem(self, payload: Any) -> tuple[str, int, dict[str, Any]] | None:
        """What the endpoint refuses this body for, before any limit (fault, status, body)."""
        if not isinstance(payload, dict):
            return _bad("request body: expected an object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return _bad("model: Field required")
        max_tokens = payload.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            return _bad("max_tokens: Field required (an integer of at least 1)")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad("messages: at least one message is required")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                return _bad(f"messages.{k}.role: Input should be 'user' or 'assistant'")
        models = self.app.config.models
        if models is not None and model not in models:
            return ("model_not_found", 404, error_body("not_found_error", f"model: {model}"))
        limit = self.app.config.context_tokens
        if limit is not None and count_tokens(payload) > limit:
            return _bad(f"prompt is too long: {count_tokens(payload)} tokens > {limit} maximum")
        return None

    def answer_offline(self, payload: Any) -> tuple[int, dict[str, Any]]:
        """The status and body the endpoint would send, minus limits, latency, faults and the
        prompt cache (a Message Batches line)."""
        problem = self.problem(payload)
        if problem is not None:
            return problem[1], problem[2]
        body, output_tokens = self.compose(payload, self.answer_key(payload))
        body["usage"] = usage(count_tokens(payload), output_tokens)
        return 200, body

    def answer_key(self, payload: dict[str, Any]) -> bytes:
        """The seed of a body's answer: streamed or not, the same answer."""
        canonical = _canonical({k: v for k, v in payload.items() if k != "stream"}).encode()
        return hashlib.blake2b(
            canonical, key=str(self.app.config.seed).encode()[:64] + b"claude", digest_size=16
        ).digest()

    def compose(self, payload: dict[str, Any], digest: bytes) -> tuple[dict[str, Any], int]:
        """The message (without usage) and its output tokens."""
        messages = payload["messages"]
        text = answers.message_text(messages[-1])
        asked = answers.last_user_text(messages)
        echo = answers.prompt_words(asked or answers.without_instructions(text))
        tools = payload.get("tools") or []
        choice = payload.get("tool_choice") or {"type": "auto"}
        content: list[dict[str, Any]]
        # After a tool's result, a model free to choose answers in words.
        replied = _is_tool_result(messages[-1])
        forced = choice.get("type") in ("tool", "any")
        if tools and choice.get("type") != "none" and (forced or not replied):
            named = {
                t.get("name") or "tool": t.get("input_schema") or {}
                for t in tools
                if isinstance(t, dict)
            }
            wanted = choice.get("name") if choice.get("type") == "tool" else None
            name, _, instance = answers.tool_call(named, wanted, asked, random.Random(digest), echo)
            produced = _encode(instance)
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{digest.hex()[:24]}",
                    "name": name,
                    "input": instance,
                }
            ]
            stop = "tool_use"
        else:
            json_answer = "json" in text.lower()
            schema = answers.instructed_schema(messages, json_answer=json_answer)
            if schema is not None:
                produced = json.dumps(answers.schema_instance(schema, random.Random(digest), echo))
            elif json_answer:
                produced = answers.json_object(random.Random(digest), echo)
            else:
                produced = answers.text_answer(digest, echo, self.app.config.completion_tokens)
            content = [{"type": "text", "text": produced}]
            stop = "end_turn"
        output_tokens = max(1, math.ceil(len(produced) / 4))
        max_tokens = int(payload["max_tokens"])
        if output_tokens > max_tokens:
            output_tokens = max_tokens
            stop = "max_tokens"
            if content[0]["type"] == "text":
                content[0]["text"] = produced[: max_tokens * 4]
        body = {
            "id": f"msg_{digest.hex()[:24]}",
            "type": "message",
            "role": "assistant",
            "model": payload["model"],
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }
        return body, output_tokens

    # -- the endpoint -------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        now = self.app.arrivals.of(request)
        stats = self.app.stats
        stats.started(now)
        try:
            return await self._messages(request, raw, now)
        finally:
            stats.finished()

    def _refuse(self, now: float, problem: tuple[str, int, dict[str, Any]]) -> web.Response:
        fault, status, body = problem
        self.app.stats.fault(fault, now)
        return _respond(status, body, {"request-id": self.app.request_id()})

    async def _messages(self, request: web.Request, raw: bytes, now: float) -> web.StreamResponse:
        cfg = self.app.config
        stats = self.app.stats
        if cfg.api_key is not None and request.headers.get("x-api-key") != cfg.api_key:
            return self._refuse(
                now, ("unauthorized", 401, error_body("authentication_error", "invalid x-api-key"))
            )
        try:
            payload = json.loads(raw)
        except ValueError:
            return self._refuse(now, _bad("There was an issue with the JSON body of the request"))
        problem = self.problem(payload)
        if problem is not None:
            return self._refuse(now, problem)
        model = payload["model"]
        input_tokens = count_tokens(payload)
        max_tokens = int(payload["max_tokens"])
        draw = self._draws.random() if cfg.forbidden or cfg.overloaded else 1.0
        if draw < cfg.forbidden:
            return self._refuse(
                now,
                (
                    "forbidden",
                    403,
                    error_body("permission_error", "Your API key does not have permission."),
                ),
            )
        if draw < cfg.forbidden + cfg.overloaded:
            stats.fault("overloaded", now)
            return _respond(
                529,
                error_body("overloaded_error", "Overloaded"),
                {"request-id": self.app.request_id()},
            )
        for kind, limiter in self._limiters:
            amount = {"requests": 1, "input-tokens": input_tokens}.get(kind, max_tokens)
            wait = limiter.try_take(now, amount)
            if wait:
                return self._too_many(now, wait, kind, model)

        created = read = 0
        prefix = cached_prefix(payload)
        if prefix is not None and cfg.prompt_cache_ttl > 0:
            prefix_tokens = min(input_tokens, count_tokens({"messages": [], **prefix}))
            if prefix_tokens >= MIN_CACHED_PREFIX:
                digest = hashlib.blake2b(_canonical(prefix).encode(), digest_size=16).digest()
                last = self._cache.get(digest)
                if last is not None and now - last <= cfg.prompt_cache_ttl:
                    read = prefix_tokens
                else:
                    created = prefix_tokens
                self._cache[digest] = now

        key = self.answer_key(payload)
        body, output_tokens = self.compose(payload, key)
        delay = cfg.latency + cfg.per_token_latency * output_tokens
        if delay > 0:
            await asyncio.sleep(delay)
        for kind, limiter in self._limiters:
            if kind == "output-tokens":  # what the answer did not use of max_tokens
                limiter.give(time.monotonic(), max_tokens - output_tokens)
        uncached = input_tokens - created - read
        body["usage"] = usage(uncached, output_tokens, created=created, read=read)
        stats.answered(
            key, model, input_tokens, output_tokens, time.monotonic(), cached_tokens=read
        )
        headers = self._limit_headers(time.monotonic())
        if payload.get("stream"):
            return await _stream(request, body, headers)
        return web.Response(body=_encode(body).encode(), content_type=JSON, headers=headers)

    def _limit_headers(self, now: float) -> dict[str, str]:
        headers = {"request-id": self.app.request_id()}
        for kind, limiter in self._limiters:
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limiter.per_minute)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(limiter.remaining(now))
            headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339(limiter.reset_after(now))
        return headers

    def _too_many(self, now: float, wait: float, kind: str, model: str) -> web.Response:
        self.app.stats.limited(now)
        headers = self._limit_headers(now)
        what = {"requests": "requests", "input-tokens": "input tokens"}.get(kind, "output tokens")
        message = f"This request would exceed the rate limit for your organization of {what} per minute for {model}."  # noqa: E501
        if wait != math.inf:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
        return _respond(429, error_body("rate_limit_error", message), headers)


def usage(
    input_tokens: int, output_tokens: int, *, created: int = 0, read: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": output_tokens,
    }


def _bad(message: str) -> tuple[str, int, dict[str, Any]]:
    return ("bad_request", 400, error_body("invalid_request_error", message))


def _respond(status: int, body: dict[str, Any], headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, body=_encode(body).encode(), content_type=JSON, headers=headers
    )


async def _stream(
    request: web.Request, body: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    """Server-sent events as Anthropic streams a message."""
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
    await response.prepare(request)
    usage_ = body["usage"]
    start = {**body, "content": [], "stop_reason": None, "usage": {**usage_, "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for index, block in enumerate(body["content"]):
        opened: dict[str, Any]
        delta: dict[str, Any]
        if block["type"] == "text":
            opened = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            opened = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": _encode(block["input"])}
        events += [
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opened},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]
    events += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": body["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage_["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    for name, data in events:
        await response.write(f"event: {name}\ndata: {_encode(data)}\n\n".encode())
    await response.write_eof()
    return response
