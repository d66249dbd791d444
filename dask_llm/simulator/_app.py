"""The aiohttp application: OpenAI's Chat Completions wire format, limits, faults, stats.

The hot path is kept short (the simulator must never be the bottleneck of a
benchmark): one ``json.loads``, one hash of the raw body (the key of an LRU of
generated answers and of the latency draw), the answer rendered from a
template (``render``), no access log, no random draw unless a fault is
configured. A new answer is seeded from a hash of the body in canonical form
(sorted keys, compact), not of its bytes, so the same body gets the same
answer however the client serialized it: online, or as a line of a batch
(``answer_offline``, the same function minus limits, latency and faults).

The order of checks on arrival, each answered at once without latency: 401
(``api_key``), 400 (bad body), 404 (``models``), 400 context length, 429
``insufficient_quota`` (billing), 403 ``forbidden``, 429 ``spurious_429`` and
529 ``overloaded`` (one draw), a Flex request's 429
``resource_unavailable`` (a draw of its own), then the quota:
``max_in_flight``, rpm, tpm (the account's, or with ``limit_per_key`` the
key's; only these consume quota or count as ``rate_limited``). Then the prompt cache's reading, the
answer, and the faults drawn after the latency (500, 503, hang, malformed
body, reset, schema violation).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from dask_llm.simulator import _answers as answers
from dask_llm.simulator._anthropic import MessagesAPI
from dask_llm.simulator._anthropic_batch import MessageBatches
from dask_llm.simulator._arrivals import Arrivals
from dask_llm.simulator._batch import BatchAPI
from dask_llm.simulator._config import SimulatorConfig
from dask_llm.simulator._http import JSON, error, error_body, respond
from dask_llm.simulator._limits import Limiter, duration, make_limiter
from dask_llm.simulator._prompt_cache import PromptCache
from dask_llm.simulator._stats import Stats

_CACHE_SIZE = 20_000
_SERVER_ERRORS = {
    "error_500": (
        500,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "error_503": (503, "The engine is currently overloaded, please try again later."),
}
INSUFFICIENT_QUOTA = error_body(
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    type_="insufficient_quota",
    code="insufficient_quota",
)
FORBIDDEN = error_body(
    "You are not allowed to sample from this model",
    type_="invalid_request_error",
    code="permission_denied",
)
SPURIOUS_429 = error_body(
    "The server is currently overloaded, please try again later.",
    type_="server_error",
    code="server_overloaded",
)
#: The issue-26 shape: a 429 that names the rate limit but carries no x-ratelimit-* headers,
#: sent while the quota has room (third-party mocks, and some of OpenAI's own answers).
RATE_LIMIT_429 = {
    "error": {
        "type": "rate_limit_error",
        "code": "rate_limit_exceeded",
        "message": "Rate limit exceeded.",
    }
}
#: Anthropic's overload answer (HTTP 529): not the quota's.
OVERLOADED_529 = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
FLEX_UNAVAILABLE = error_body(
    "Resource unavailable: Flex processing has no capacity for this request now. Retry "
    "later, or send it at the default service tier.",
    type_="resource_unavailable",
    code="resource_unavailable",
)

#: The limiters of an account (or a key) with the kind each counts: requests, tokens.
Windows = tuple[tuple[str, Limiter], ...]
# A problem with a request: (fault counter, HTTP status, OpenAI error body).
Problem = tuple[str, int, dict[str, Any]]

# Encoders built once (``json.dumps`` with options builds one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def render(
    body: dict[str, Any],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    service_tier: str = "default",
) -> bytes:
    """The answer with its usage and service tier as compact JSON: what ``json.dumps`` of
    ``with_usage`` gives, byte for byte.

    An answer with plain content is formatted from a template (about twice as
    fast as encoding the nested dict, on the hot path); tool calls are encoded.
    """
    choice = body["choices"][0]
    message = choice["message"]
    usage = (
        f'"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},'
        f'"total_tokens":{prompt_tokens + completion_tokens},'
        f'"prompt_tokens_details":{{"cached_tokens":{cached_tokens},"audio_tokens":0}}}},'
        f'"service_tier":{_encode(service_tier)}}}'
    )
    if len(message) != 3 or len(body) != 6:  # tool calls, or a shape the template lacks
        return (_encode(body)[:-1] + "," + usage).encode()
    return (
        f'{{"id":"{body["id"]}","object":"chat.completion","created":{body["created"]},'
        f'"model":{_encode(body["model"])},"system_fingerprint":"fp_dask_llm_sim",'
        f'"choices":[{{"index":0,"message":{{"role":"assistant",'
        f'"content":{_encode(message["content"])},"refusal":null}},"logprobs":null,'
        f'"finish_reason":"{choice["finish_reason"]}"}}],{usage}'
    ).encode()


def with_usage(
    body: dict[str, Any],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    service_tier: str = "default",
) -> dict[str, Any]:
    """The answer ``body`` with its ``usage`` (cached tokens in its details) and tier."""
    full = dict(body)
    full["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
    }
    full["service_tier"] = service_tier
    return full


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


def _bad(message: str, param: str | None, code: str | None = None) -> Problem:
    return (
        "bad_request",
        400,
        error_body(message, type_="invalid_request_error", param=param, code=code),
    )


class SimulatorApp:
    """State and handlers of one simulated provider."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.stats = Stats()
        self.arrivals = Arrivals()
        self._faults = random.Random(config.seed)
        self._ids = random.Random()
        self._answers: OrderedDict[bytes, tuple[dict[str, Any], int, dict[str, Any] | None]] = (
            OrderedDict()
        )
        self._seed = str(config.seed).encode()[:64]
        self._flex = random.Random(f"{config.seed}-flex")
        self.prompt_cache = PromptCache(config.prompt_cache_ttl)
        self._make_limiters()
        self._billing = config.insufficient_quota or config.quota_after is not None
        self._arrival_draw = (
            config.forbidden > 0 or config.spurious_429 > 0 or config.overloaded > 0
        )
        late = (
            ("connection_reset", config.connection_reset),
            ("hang", config.hang),
            ("error_500", config.error_rate),
            ("error_503", config.error_503),
            ("malformed_json", config.malformed_json),
        )
        self._late_faults = tuple((name, p) for name, p in late if p > 0)
        self._late_draw = bool(self._late_faults) or config.schema_violation > 0
        self.batches = BatchAPI(self)
        self.claude = MessagesAPI(self)
        self.claude_batches = MessageBatches(self, self.claude)

    def _make_limiters(self) -> None:
        cfg = self.config
        self._requests: Limiter | None = None
        self._tokens: Limiter | None = None
        if cfg.rpm:
            self._requests = make_limiter(cfg.limit_mode, cfg.rpm, cfg.limit_window, self.started)
        if cfg.tpm:
            self._tokens = make_limiter(cfg.limit_mode, cfg.tpm, cfg.limit_window, self.started)
        self._windows = tuple(
            (kind, w) for kind, w in (("requests", self._requests), ("tokens", self._tokens)) if w
        )
        # limit_per_key: each key's own (requests, tokens, windows), made on its first request.
        self._keyed: dict[str, tuple[Limiter | None, Limiter | None, Windows]] = {}

    def _limits_of(self, request: web.Request) -> tuple[Limiter | None, Limiter | None, Windows]:
        """The limiters a request counts against: the account's, or (``limit_per_key``) its
        key's. Bounded by the keys a test or benchmark uses."""
        if not self.config.limit_per_key:
            return self._requests, self._tokens, self._windows
        key = request.headers.get("Authorization", "")
        found = self._keyed.get(key)
        if found is None:
            cfg = self.config
            requests, tokens = (
                make_limiter(cfg.limit_mode, per_minute, cfg.limit_window, self.started)
                if per_minute
                else None
                for per_minute in (cfg.rpm, cfg.tpm)
            )
            windows = tuple(
                (kind, w) for kind, w in (("requests", requests), ("tokens", tokens)) if w
            )
            found = self._keyed[key] = (requests, tokens, windows)
        return found

    def reset(self) -> None:
        """Clear stats, limits, files and batches (fixed slices stay aligned to the start)."""
        self.stats.reset()
        self._faults = random.Random(self.config.seed)
        self._flex = random.Random(f"{self.config.seed}-flex")
        self.prompt_cache.clear()
        for window in (self._requests, self._tokens):
            if window is not None:
                window.clear()
        self._keyed.clear()
        self.batches.reset()
        self.claude.reset()
        self.claude_batches.reset()

    def make_app(self) -> web.Application:
        self.started = time.monotonic()
        self._make_limiters()
        self.claude.make_limiters()
        self.stats.reset()  # the series starts with the server
        app = web.Application(
            client_max_size=32 * 1024 * 1024, middlewares=[self.arrivals.middleware]
        )
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self.batches.add_routes(app.router)
        self.claude_batches.add_routes(app.router)  # before /v1/messages: no clash either way
        self.claude.add_routes(app.router)
        app.router.add_get("/sim/stats", self.get_stats)
        app.router.add_post("/sim/reset", self.post_reset)
        return app

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/sim/stats`` reports; call on the event loop."""
        snapshot = self.stats.snapshot()
        snapshot.update(self.batches.counters(time.monotonic()))
        snapshot.update(self.claude_batches.counters())
        return snapshot

    # -- small endpoints ----------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        names = self.config.models or ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini")
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "dask-llm-simulator"}
            for n in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # -- shared with the Batch API -----------------------------------------------------
    def request_id(self) -> str:
        return f"req_{self._ids.getrandbits(96):024x}"

    def unauthorized(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the configured key (the key is never echoed)."""
        key = self.config.api_key
        if key is None or request.headers.get("Authorization", "") == f"Bearer {key}":
            return None
        return error(
            401,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            type_="invalid_request_error",
            code="invalid_api_key",
        )

    def answer_key(self, payload: dict[str, Any]) -> bytes:
        """The seed of a body's answer: a hash of its canonical JSON and the simulator's seed.

        The service tier is left out: Flex and the default tier give the same answer."""
        if "service_tier" in payload:
            payload = {k: v for k, v in payload.items() if k != "service_tier"}
        canonical = _canonical(payload).encode()
        return hashlib.blake2b(canonical, key=self._seed, digest_size=16).digest()

    def problem(self, payload: Any) -> Problem | None:
        """What the online endpoint would refuse this body for, before any limit or fault."""
        if not isinstance(payload, dict):
            return _bad("Invalid type for request body: expected an object.", None)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return _bad("you must provide a model parameter", "model", "missing_required_parameter")
        messages = payload.get("messages")
        if messages is None:
            return _bad(
                "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
            )
        if not isinstance(messages, list) or not messages:
            return _bad(
                "Invalid 'messages': expected a non-empty array.", "messages", "invalid_type"
            )
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                return _bad(
                    f"Missing required parameter: 'messages[{k}].role'.",
                    f"messages[{k}].role",
                    "missing_required_parameter",
                )
        n = payload.get("n", 1)
        if n not in (None, 1):
            return _bad("The simulator answers n=1 only.", "n", "invalid_value")
        for name in ("max_tokens", "max_completion_tokens"):
            limit = payload.get(name)
            if limit is not None and (type(limit) is not int or limit < 1):
                return _bad(
                    f"Invalid '{name}': expected an integer of at least 1.", name, "invalid_value"
                )
        if self.config.models is not None and model not in self.config.models:
            return (
                "model_not_found",
                404,
                error_body(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    type_="invalid_request_error",
                    code="model_not_found",
                ),
            )
        return None

    def too_long(self, prompt_tokens: int) -> Problem | None:
        limit = self.config.context_tokens
        if limit is None or prompt_tokens <= limit:
            return None
        return (
            "context_length_exceeded",
            400,
            error_body(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages resulted in {prompt_tokens} tokens. Please reduce the length of "
                "the messages.",
                type_="invalid_request_error",
                param="messages",
                code="context_length_exceeded",
            ),
        )

    def refusal(self, payload: Any) -> Problem | None:
        """Why the endpoint refuses this body whatever the limits and faults (or None)."""
        problem = self.problem(payload)
        if problem is None:
            problem = self.too_long(count_tokens(payload))
        return problem

    def answer_offline(self, payload: Any) -> tuple[int, dict[str, Any]]:
        """The status and body the online endpoint would send, minus limits, latency, faults."""
        problem = self.problem(payload)
        if problem is None:
            prompt_tokens = count_tokens(payload)
            problem = self.too_long(prompt_tokens)
        if problem is not None:
            return problem[1], problem[2]
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        body, completion_tokens, _ = self._compose(payload, self.answer_key(payload), max_tokens)
        return 200, with_usage(body, prompt_tokens, completion_tokens)

    # -- headers ------------------------------------------------------------------------
    def _limit_headers(self, now: float, windows: Windows | None = None) -> dict[str, str]:
        headers = {"x-request-id": self.request_id(), "openai-processing-ms": "1"}
        for kind, window in self._windows if windows is None else windows:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.per_minute)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining(now))
            headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_after(now))
        return headers

    # -- the endpoint -------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        # Arrival is the moment the request's bytes reached the server (``_arrivals``),
        # however late this handler runs (so, at times, before a request already
        # counted: the sliding window and the peaks place it among the others), and
        # peaks, series and limits all use this one timestamp.
        raw = await request.read()
        stats = self.stats
        now = self.arrivals.of(request)
        stats.started(now)
        try:
            return await self._chat(request, raw, now)
        finally:
            stats.finished()

    def _refuse(self, now: float, problem: Problem) -> web.Response:
        fault, status, body = problem
        self.stats.fault(fault, now)
        return respond(status, body, {"x-request-id": self.request_id()})

    async def _chat(self, request: web.Request, raw: bytes, now: float) -> web.StreamResponse:
        cfg = self.config
        stats = self.stats
        if cfg.api_key is not None:
            denied = self.unauthorized(request)
            if denied is not None:
                stats.fault("unauthorized", now)
                return denied
        try:
            payload = json.loads(raw)
        except ValueError:
            return self._refuse(
                now,
                _bad(
                    "We could not parse the JSON body of your request. (HINT: This likely "
                    "means you aren't using your HTTP library correctly. The OpenAI API "
                    "expects a JSON payload, but what was sent was not valid JSON.)",
                    None,
                ),
            )
        problem = self.problem(payload)
        if problem is not None:
            return self._refuse(now, problem)
        model = payload["model"]
        prompt_tokens = count_tokens(payload)
        problem = self.too_long(prompt_tokens)
        if problem is not None:
            return self._refuse(now, problem)
        if self._billing and (
            cfg.insufficient_quota
            or (cfg.quota_after is not None and stats.successes >= cfg.quota_after)
        ):
            return self._refuse(now, ("insufficient_quota", 429, INSUFFICIENT_QUOTA))
        if self._arrival_draw:
            draw = self._faults.random()
            if draw < cfg.forbidden:
                return self._refuse(now, ("forbidden", 403, FORBIDDEN))
            if draw < cfg.forbidden + cfg.spurious_429:
                return self._spurious(now)
            if draw < cfg.forbidden + cfg.spurious_429 + cfg.overloaded:
                return self._overloaded(now)
        requests, tokens, windows = self._limits_of(request)
        flex = payload.get("service_tier") == "flex"
        if flex:
            stats.flex_requests += 1
            if cfg.flex_unavailable > 0 and self._flex.random() < cfg.flex_unavailable:
                stats.fault("flex_unavailable", now)
                headers = self._limit_headers(now, windows)
                return respond(429, FLEX_UNAVAILABLE, headers)

        # Quota, checked on arrival as the provider does.
        if cfg.max_in_flight is not None and stats.in_flight > cfg.max_in_flight:
            return self._too_many(now, 1.0, "requests", "Too many concurrent requests.", windows)
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if requests is not None:
            wait = requests.try_take(now, 1)
            if wait:
                return self._too_many(
                    now,
                    wait,
                    "requests",
                    f"Rate limit reached for {model} on requests per min (RPM): Limit {cfg.rpm}.",
                    windows,
                )
        if tokens is not None:
            cost = prompt_tokens + int(max_tokens or cfg.completion_tokens)
            wait = tokens.try_take(now, cost)
            if wait == math.inf:
                window = tokens
                return self._too_many(
                    now,
                    wait,
                    "tokens",
                    f"Request too large for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                    f"Requested {cost}. The input or output tokens must be reduced in order to "
                    f"run successfully. (The simulator allows {window.budget:g} tokens per "
                    f"{window.window:g} s window.)",
                    windows,
                )
            if wait:
                return self._too_many(
                    now,
                    wait,
                    "tokens",
                    f"Rate limit reached for {model} on tokens per min (TPM): "
                    f"Limit {cfg.tpm}, Requested {cost}.",
                    windows,
                )

        cached_tokens = self.prompt_cache.cached_tokens(model, payload, prompt_tokens, now)
        digest = hashlib.blake2b(raw, key=self._seed, digest_size=16).digest()
        cached = self._answers.get(digest)
        if cached is None:
            cached = self._compose(payload, self.answer_key(payload), max_tokens)
            self._answers[digest] = cached
            if len(self._answers) > _CACHE_SIZE:
                self._answers.popitem(last=False)
        else:
            self._answers.move_to_end(digest)
        body, completion_tokens, schema = cached

        # Faults: one uniform draw, split into bands (each band's width is its probability).
        fault = None
        if self._late_draw:
            draw = self._faults.random()
            edge = 0.0
            for name, p in self._late_faults:
                edge += p
                if draw < edge:
                    fault = name
                    break
            else:
                if schema is not None and draw < edge + cfg.schema_violation:
                    fault = "schema_violation"
            if fault is not None:
                stats.fault(fault, now)  # counted on arrival: a hang never gets further

        delay = self._latency(digest, completion_tokens)
        if flex:
            delay *= cfg.flex_slowdown
        if fault == "hang":
            await asyncio.sleep(cfg.hang_seconds)
        if delay > 0:
            await asyncio.sleep(delay)
        headers = self._limit_headers(time.monotonic(), windows)
        if fault is not None:
            if fault == "connection_reset":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if fault in _SERVER_ERRORS:
                status, message = _SERVER_ERRORS[fault]
                return error(status, message, type_="server_error", headers=headers)
            if fault == "malformed_json":
                broken = json.dumps(body)[:40]
                return web.Response(body=broken.encode(), content_type=JSON, headers=headers)
            if fault == "schema_violation" and schema is not None:
                body = self._violated(body, schema)

        tier = "flex" if flex else "default"
        stats.answered(
            digest,
            model,
            prompt_tokens,
            completion_tokens,
            time.monotonic(),
            cached_tokens=cached_tokens,
            flex=flex,
        )
        if payload.get("stream"):
            full = with_usage(body, prompt_tokens, completion_tokens, cached_tokens, tier)
            return await self._stream(request, full, headers, payload)
        return web.Response(
            body=render(body, prompt_tokens, completion_tokens, cached_tokens, tier),
            content_type=JSON,
            headers=headers,
        )

    def _too_many(
        self, now: float, wait: float, kind: str, message: str, windows: Windows | None = None
    ) -> web.Response:
        self.stats.limited(now)
        headers = self._limit_headers(now, windows)
        if wait != math.inf:  # a request too large never fits: no point in retrying
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, round(wait * 1000)))
            message += " Please try again in " + duration(wait) + "."
        return error(429, message, type_=kind, code="rate_limit_exceeded", headers=headers)

    def _spurious(self, now: float) -> web.Response:
        """A 429 that is not the quota's: no x-ratelimit-* headers, a fixed retry-after."""
        self.stats.fault("spurious_429", now)
        wait = self.config.spurious_retry_after
        if self.config.spurious_429_shape == "rate_limit":
            # As the provider sends it: retry-after alone ("1" by default; a
            # fraction of a second as a decimal, which the openai SDK and dask-llm read).
            headers = {"x-request-id": self.request_id(), "retry-after": f"{wait:g}"}
            return respond(429, RATE_LIMIT_429, headers)
        headers = {
            "x-request-id": self.request_id(),
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(round(wait * 1000)),
        }
        return respond(429, SPURIOUS_429, headers)

    def _overloaded(self, now: float) -> web.Response:
        """A 529 overloaded_error: no quota used, the spurious 429's retry-after."""
        self.stats.fault("overloaded", now)
        wait = self.config.spurious_retry_after
        headers = {
            "x-request-id": self.request_id(),
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(round(wait * 1000)),
        }
        return respond(529, OVERLOADED_529, headers)

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
    ) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
        """The answer (without usage), its completion tokens, and the schema it follows if any."""
        messages = payload["messages"]
        text = answers.message_text(messages[-1])
        echo = answers.prompt_words(answers.without_instructions(text))
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        finish = "stop"
        schema: dict[str, Any] | None = None
        tools = payload.get("tools") or []
        choice = payload.get("tool_choice")
        response_format = payload.get("response_format") or {}
        asked = answers.last_user_text(messages)
        # After a tool's result, a model free to choose answers in words.
        replied = isinstance(messages[-1], dict) and messages[-1].get("role") == "tool"
        if tools and choice != "none" and not (replied and choice in (None, "auto")):
            functions = [t.get("function") or {} for t in tools if isinstance(t, dict)]
            named = {f.get("name") or "tool": f.get("parameters") or {} for f in functions}
            forced = choice.get("function") if isinstance(choice, dict) else None
            wanted = forced.get("name") if isinstance(forced, dict) else None
            name, schema, instance = answers.tool_call(
                named, wanted, asked, random.Random(digest), echo
            )
            arguments = json.dumps(instance)
            message["tool_calls"] = [
                {
                    "id": f"call_{digest.hex()[:24]}",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
            finish = "tool_calls"
            produced = arguments
        elif response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            produced = json.dumps(answers.schema_instance(schema, random.Random(digest), echo))
            message["content"] = produced
        else:
            json_answer = response_format.get("type") == "json_object" or "json" in text.lower()
            schema = answers.instructed_schema(messages, json_answer=json_answer)
            if schema is not None:
                produced = json.dumps(answers.schema_instance(schema, random.Random(digest), echo))
            elif json_answer and (keys := answers.PromptValues(asked).json_keys()):
                produced = answers.keyed_json(keys, random.Random(digest), echo)
            elif json_answer:
                produced = answers.json_object(random.Random(digest), echo)
            else:
                produced = answers.text_answer(digest, echo, self.config.completion_tokens)
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
        return body, completion_tokens, schema

    def _violated(self, body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(json.dumps(body))
        message = body["choices"][0]["message"]
        try:
            if message.get("tool_calls"):
                fn = message["tool_calls"][0]["function"]
                fn["arguments"] = json.dumps(answers.violate(json.loads(fn["arguments"]), schema))
            else:
                instance = json.loads(message["content"])
                message["content"] = json.dumps(answers.violate(instance, schema))
        except ValueError:  # cut short by max_tokens: already not an instance of the schema
            pass
        return body

    async def _stream(
        self,
        request: web.Request,
        full: dict[str, Any],
        headers: dict[str, str],
        payload: dict[str, Any],
    ) -> web.StreamResponse:
        """SSE chunks: the delta, the finish reason, and (``include_usage``) a usage chunk.

        With ``stream_options.include_usage`` every chunk carries ``"usage": null``
        and a last chunk with no choices carries the usage, as OpenAI sends them.
        """
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        choice = full["choices"][0]
        keys = ("id", "created", "model", "service_tier", "system_fingerprint")
        base: dict[str, Any] = {k: full[k] for k in keys}
        base["object"] = "chat.completion.chunk"
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        if include_usage:
            base["usage"] = None
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
        if include_usage:
            chunks.append({**base, "choices": [], "usage": full["usage"]})
        for chunk in chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
