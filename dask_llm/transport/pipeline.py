"""Per-event-loop HTTP clients for the models inside a chain, and the stages every request passes.

An async HTTP client belongs to the event loop it first ran on.
langchain-openai and langchain-anthropic cache one default async client per
base URL for the whole process, so a chain used on one loop and then on
another fails with ``RuntimeError: Event loop is closed``, and the user's
own ``asyncio.run(chain.ainvoke(...))`` breaks once our loop has touched
that shared client. So each partition's loop gets private copies of the
chain's models (of every provider in ``providers``), each with an SDK
client of its own (same key, base URL, headers) on the SDK's aiohttp
transport, SDK retries off (dask-llm retries, one layer only), closed when
the loop ends: ``Provider.local_model`` builds it, and the job's
``JobTransport`` wraps its transport. The user's model objects and clients
are never touched. A model given its own ``http_async_client`` by the user
keeps it: that client is the user's choice, and its requests pass none of
the stages below.

Every request of those clients passes, in ``JobTransport``::

    job stopped? -> request cache -> identical request in flight? -> budget
        -> throttle -> send online   |   -> a batch line (batch=)
    then, on the answer: usage, breaker, cache, run record

* **Request cache.** The key is what is actually sent: method, path and the
  JSON body (model, messages, tools, response format, sampling parameters),
  so it cannot go stale whatever the chain computed to build it. A hit is
  answered from the cache without touching the throttle; the chain's own
  parsers then run on it as on a fresh answer. Answers are stored the
  moment they are read, before the chain parses them.
* **In flight.** An identical body already on the wire is waited for, not
  sent again (``transport.dedup``).
* **Throttle.** Pacing and concurrency for the whole job (``limits.pacer``).
* **Sender.** Online, or with ``batch=`` a line of this partition's next
  Batch API batch (``transport.batch``): the request waits for its line and gets it
  back as if it had come online (or, for a failed or expired line under the
  online fallback, is sent online after all). Batch lines skip the throttle:
  the Batch API has a pool of its own.
* **Usage.** The ``usage`` block of each answer is credited to the chain
  call running in this context (``core.usage.Attempt``); answers without one are
  marked unknown, never counted as zero.
* **Breaker.** An answer no retry can fix (401, 403, 404,
  ``insufficient_quota``) or a host that refuses connections or whose name
  does not resolve stops the job (``engine.job``); connection errors are re-raised
  naming the host and the cause.

``JobTransport.exchange`` is every stage for one request, answered as an
``Answer``: the compiled path (``dask_llm.compiled``) sends its own requests
there. Around a chain call, a ``Capture`` records the requests LangChain
sends and their answers (or, with ``abort``, records the first one and sends
nothing), and a ``Replay`` answers a request of exactly the given body with
an answer (or an exception) already had, passing no stage: how the compiled
path learns a chain's request, proves itself, and hands LangChain an answer
it does not read.

The throttle wraps ``transport.pipeline`` of the httpx client: the one private
attribute we touch; ``tests/test_transport`` fails loudly if the SDK moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import json
import socket
import time
from typing import Any, cast

import aiohttp
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableBinding

from dask_llm.cache import request_key
from dask_llm.chains.graph import find, rewrite
from dask_llm.chains.outputs import is_configurable_model
from dask_llm.core.config import FLEX_REQUEST_TIMEOUT
from dask_llm.core.errors import JobStopped
from dask_llm.core.outcome import Outcome
from dask_llm.core.usage import MAX_TOKENS, current_attempt
from dask_llm.limits.coordinator import RENEW_S
from dask_llm.providers import OPENAI, Provider, provider_of
from dask_llm.transport import dedup as dedup
from dask_llm.transport.batch import GO_ONLINE, Batcher
from dask_llm.transport.wire import Answer, host_of, outcome_of

_DROP_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
#: getaddrinfo's answers for a name that does not exist (not a resolver that failed).
_NO_SUCH_NAME = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
)


class JobTransport:
    """An httpx async transport: the job's stages around the SDK's own transport."""

    def __init__(
        self,
        inner: Any,
        job: Any,
        stats: Any,
        batcher: Batcher | None = None,
        *,
        provider: Provider = OPENAI,
    ) -> None:
        self.inner = inner
        self.job = job
        self.stats = stats
        self.provider = provider
        # The Batch API, for the providers whose batches the batch sender speaks.
        self.batcher = batcher if provider.batch else None
        # Without a cache (cache=False), this partition's answers, so that a repeat of
        # a request answers from them as the cache would (and as estimate() counts);
        # they go with the partition's loop.
        self._answers: dict[str, Answer] = {}
        # With the SDK's aiohttp transport, requests are admitted by the session's
        # request class, at the moment they are written (see PacedRequest).
        self.gated = _install_gate(inner)

    def forget(self) -> None:
        """Drop the answers kept for repeats: the loop's clients are closed.

        The client, its transport and the models of a closed loop stay in reference
        cycles (the SDK's and LangChain's), which only a full collection frees, and
        the job's collector runs rarely (``engine.job``, "Garbage collection"): kept,
        every answer of every partition a process ran stayed until the job ended (with
        the ended runs, ``PartitionRun.run``: a worker 318 -> 583 MB at full size).
        """
        self._answers.clear()

    async def handle_async_request(self, request: Any) -> Any:
        capture = CAPTURE.get()
        if capture is not None and capture.abort:
            capture.requests.append(request)
            raise CaptureAbort("captured, not sent")
        replay = REPLAY.get()
        if replay is not None and request.method == "POST":
            if request.content == replay.body:
                if replay.error is not None:
                    raise replay.error
                assert replay.answer is not None
                return _response(request, replay.answer)
            replay.missed = True  # LangChain built another request: it goes the usual way
        if capture is not None:
            capture.requests.append(request)
        answer = await self.exchange(request)
        if capture is not None:
            capture.answers.append(answer)
        return _response(request, answer)

    async def exchange(self, request: Any) -> Answer:
        """Every stage for one request; the answer (the compiled path calls this directly)."""
        job = self.job
        job.check()
        attempt = current_attempt.get()
        body = request.content if request.method == "POST" else b""
        key = request_key(request.method, request.url.path, body) if body else None
        fresh = key is None or (attempt is not None and key in attempt.refresh)
        if not fresh and job.cache is not None:
            assert key is not None
            cached = Answer.from_cache(job.cache_get([key], self.stats).get(key))
            if cached is not None:
                self.stats.cache_hits += 1
                if attempt is not None:
                    attempt.keys.append(key)
                    attempt.cached += 1
                return cached
        if not fresh and job.cache is None and key in self._answers:
            if attempt is not None:
                attempt.keys.append(key)
                attempt.cached += 1  # this partition paid for it already
            return self._answers[key]
        # In batch mode this row waits (for its batch, or an identical request's): the
        # batcher counts it, to submit once nothing else can arrive.
        waiting = (
            self.batcher.waiting()
            if self.batcher is not None and self._is_chat(request)
            else contextlib.nullcontext()
        )
        with waiting:
            if fresh:
                answer = await self._send(request, body, key, fresh=True)
            else:
                assert key is not None
                answer, mine = await dedup.once(key, lambda: self._send(request, body, key))
                if not mine and attempt is not None:
                    attempt.cached += 1  # the other caller paid for it
                if job.cache is None and answer.status < 400:
                    self._answers[key] = answer.kept()
        if attempt is not None and key is not None:
            attempt.keys.append(key)
        return answer

    async def _send(
        self, request: Any, body: bytes, key: str | None, *, fresh: bool = False
    ) -> Answer:
        if self.batcher is not None and key is not None and self._is_chat(request):
            answer = await self._send_batch(request, body, key, fresh=fresh)
            if answer is not None:
                return answer
        return await self._send_online(request, body, key)

    async def _send_batch(
        self, request: Any, body: bytes, key: str, *, fresh: bool
    ) -> Answer | None:
        """The answer from a batch line; None to send it online (fallback, deadline)."""
        job = self.job
        assert self.batcher is not None
        worst = 0.0
        if job.ledger.budgeted and body:
            reserved = await self.batcher.reserve(lambda: job.worst_cost(body, batch=True))
            if reserved is None:
                job.check()  # the ledger has stopped the job: budget reached
                raise JobStopped("budget reached", kind="budget")
            worst = reserved
        sent_at = job.recorder.request_started()  # run record: a line waits as long as its batch
        outcome = Outcome(status=None, batch=True)  # no answer (yet)
        try:
            result = await self.batcher.answer(
                request, body, key, provider=self.provider, fresh=fresh
            )
            if result is GO_ONLINE:
                # The line came back unanswered: it goes online, and costs nothing.
                outcome = Outcome(status=408, batch=True)
                return None
            answer = cast(Answer, result)
            outcome = outcome_of(
                answer.status, None, answer.body, request, provider=self.provider, batch=True
            )
            if outcome.fatal is not None:
                job.fatal_answer(outcome.fatal, body)
            if outcome.ok:
                self._paid(outcome, worst, body)
            return answer
        finally:
            job.recorder.request_finished(sent_at, outcome)
            if worst and not outcome.ok:
                # No answer: it may have been paid for. An error line: not billed.
                job.ledger.settle(worst, worst if outcome.status is None else 0.0)
            if worst:
                self.batcher.settled()  # lines waiting for the budget look again

    def _paid(self, outcome: Outcome, worst: float, body: bytes) -> None:
        """Credit a paid answer to the request ``body``: the chain call's usage, the budget,
        the largest completion, and the breaker (its model has answered)."""
        job = self.job
        self.stats.calls_paid += 1
        job.answered(body)
        if outcome.completion_tokens is not None:
            job.completion_seen(outcome.completion_tokens)
        attempt = current_attempt.get()
        if attempt is not None:
            attempt.paid(
                outcome.model,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                batch=outcome.batch,
                cached_tokens=outcome.cached_tokens,
                cache_write_tokens=outcome.cache_write_tokens,
                tier=outcome.tier,
            )
        if worst:
            cost = outcome.cost(job.options.price_table)
            job.ledger.settle(worst, worst if cost is None else cost)

    async def _reserve(self, worst: float) -> None:
        """Reserve a request's worst-case cost against the job's budget (if it has one)."""
        if not worst:
            return
        job = self.job
        while (reserved := job.ledger.reserve(worst)) is None:
            job.check()
            await asyncio.sleep(RENEW_S)
        if not reserved:
            job.check()  # the ledger has stopped the job: budget reached
            raise JobStopped("budget reached", kind="budget")

    async def _send_online(self, request: Any, body: bytes, key: str | None) -> Answer:
        job = self.job
        # Its provider's own pacing (a job with two providers paces each to its limits).
        throttle = job.throttle.of(self.provider.name, output_apart=self.provider.output_limit)
        match = MAX_TOKENS.search(body) if body else None
        max_tokens = int(match.group(1)) if match else None
        estimate = throttle.estimate_tokens(len(body), max_tokens)
        worst = job.worst_cost(body) if job.ledger.budgeted and body else 0.0
        await self._reserve(worst)
        expected = throttle.expected_output(max_tokens) if self._is_chat(request) else 0.0
        started, output = await throttle.acquire(estimate, admit=not self.gated, output=expected)
        tiers = job.tiers() if self.provider is OPENAI and body else None
        by_flex = False
        if tiers is not None and not self.provider.is_flex(body) and tiers.tier() == "flex":
            # deadline=: a Flex answer is still back in time (core.deadline).
            request, body = _as_flex(request, body)
            by_flex = True
        sent_at = job.recorder.request_started()  # run record (observe.record)
        sent_mono = time.monotonic()
        status = None
        headers = None
        data = b""
        try:
            job.check()  # it may have stopped while this request waited for its turn
            paced = _Gate(throttle, estimate, expected) if self.gated else None
            gate = _GATE.set(paced) if paced is not None else None
            try:
                response = await self.inner.handle_async_request(request)
                data = await response.aread()
            # Whatever the HTTP stack raised, re-raised with the host and the real cause.
            except Exception as exc:
                raise _connection_error(exc, request, job) from exc
            finally:
                if gate is not None:
                    _GATE.reset(gate)
                if paced is not None and paced.admitted is not None:
                    started = paced.admitted  # its paced start: latency counts from it
                if paced is not None:
                    output = paced.booked  # its output tokens, booked as it was written
            status = response.status_code
            headers = response.headers
        finally:
            # The answer read once; every stage below acts on this outcome.
            # A 429 without rate-limit headers is read against the freshest of the job's
            # answers from the same provider.
            headroom = throttle.headroom(self.provider.remaining)
            outcome = outcome_of(
                status,
                headers,
                data,
                request,
                provider=self.provider,
                flex=self.provider.is_flex(body),
                room=headroom.room() if status == 429 else None,
            )
            if outcome.fatal is not None:
                # Before the slot is released: a request of another thread waiting for
                # it must find the job stopped.
                job.fatal_answer(outcome.fatal, body)
            if tiers is not None:
                # deadline=: the limits the headers announce, Flex's latency and
                # availability and the list-price latency, measured (core.deadline).
                tiers.announced(rpm=outcome.announced.rpm, tpm=outcome.announced.tpm)
                if status == 200 or (by_flex and outcome.unavailable):
                    tiers.observe(
                        time.monotonic() - sent_mono,
                        flex=by_flex,
                        unavailable=outcome.unavailable,
                        tokens=(outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0),
                    )
            job.recorder.request_finished(sent_at, outcome)
            # Its output settled before the headers are read: what they say is left is
            # after the provider gave back what the answer did not use.
            throttle.settle_output(output, status, outcome.completion_tokens)
            throttle.observe(
                started,
                status,
                headers,
                quota=outcome.quota,
                announced=outcome.announced,
                remaining=self.provider.remaining,
            )
            if outcome.ok:
                throttle.record_usage(len(body), outcome.prompt_tokens, outcome.completion_tokens)
            throttle.release()
            if worst and not outcome.ok:
                # No answer: it may have been paid for. An error answer: not billed.
                job.ledger.settle(worst, worst if status is None else 0.0)
        assert status is not None and headers is not None
        job.connection_ok()
        answer = Answer(
            status, [(k, v) for k, v in headers.items() if k.lower() not in _DROP_HEADERS], data
        )
        if outcome.ok:
            if key is not None and job.cache is not None:
                # Paid for: kept before anything after it (accounting, parsing) can fail.
                job.cache_put(key, answer.to_cache(), self.stats)
            self._paid(outcome, worst, body)
        elif outcome.unavailable:
            self.stats.flex_unavailable += 1
        elif status == 429:
            self.stats.rate_limited += 1
        return answer

    def _is_chat(self, request: Any) -> bool:
        return request.method == "POST" and self.provider.is_chat(request.url.path)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> JobTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.inner.__aexit__(*args)


class Capture:
    """Requests (and their answers) of the chain call running in this context.

    ``abort``: record the first request and raise ``CaptureAbort`` instead of
    sending it (``compiled`` learns the SDK's request for a chain this way).
    """

    __slots__ = ("abort", "answers", "requests")

    def __init__(self, *, abort: bool = False) -> None:
        self.abort = abort
        self.requests: list[Any] = []
        self.answers: list[Answer] = []


class CaptureAbort(Exception):
    """Raised by the transport in place of sending a captured request."""


class Replay:
    """The answer (or the exception) a request with exactly this body gets, without a stage.

    The compiled path hands an answer it did not parse to LangChain this way, so
    that LangChain's own value or error comes of it; ``missed``: LangChain sent
    another body.
    """

    __slots__ = ("answer", "body", "error", "missed")

    def __init__(
        self, body: bytes, answer: Answer | None, error: BaseException | None = None
    ) -> None:
        self.body = body
        self.answer = answer
        self.error = error
        self.missed = False


#: Set around a chain call whose requests are to be recorded (``Capture``) or replayed.
CAPTURE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar(
    "dask_llm_capture", default=None
)
REPLAY: contextvars.ContextVar[Replay | None] = contextvars.ContextVar(
    "dask_llm_replay", default=None
)


class _Gate:
    """What ``PacedRequest`` runs before writing: the job's pacing, then its strict window."""

    __slots__ = ("admitted", "booked", "output", "throttle", "tokens")

    def __init__(self, throttle: Any, tokens: float, output: float) -> None:
        self.throttle = throttle
        self.tokens = tokens
        self.output = output  # the output tokens it may use (booked where paced apart)
        self.admitted: float | None = None  # when the pacer let it go
        self.booked = 0.0  # the output tokens booked for it

    async def __call__(self) -> None:
        self.admitted, booked = await self.throttle.admit(
            self.tokens, unwritten=True, output=self.output
        )
        self.booked += booked

    def written(self) -> None:
        """The request is on the wire (or its write failed): the pacer counts it from now."""
        self.throttle.written(self.tokens)


#: The admission of the request being sent in this context (set around the SDK's call).
_GATE: contextvars.ContextVar[_Gate | None] = contextvars.ContextVar("dask_llm_gate", default=None)


class PacedRequest(aiohttp.ClientRequest):
    """aiohttp's request, paced and admitted by the job's pacer at the moment it is written.

    Pacing admits a request over any sliding second at the moment it goes on the
    wire. Between the SDK's call and the socket, aiohttp suspends (to open or pick
    a connection) and, before Python 3.12, writes the request in a task of its
    own; a busy loop runs both late. Measured here, on Python 3.11: requests
    admitted before the SDK's call were written up to 0.8 s later (p90 0.12 s),
    and after ``send()`` began up to 0.5 s later, which bunched them at the
    provider 20-50% above the limit. ``write_bytes`` runs right before the bytes
    go out, on every Python: that is where they are paced (their start booked,
    ``Throttle.admit``) and admitted; once written, the pacer counts them from
    then (``written``).
    """

    async def send(self, conn: Any) -> Any:
        gate = None if self.body_given() else _GATE.get()
        if gate is None:
            return await super().send(conn)
        await gate()  # no body: headers alone are written by send()
        try:
            return await super().send(conn)
        finally:
            gate.written()

    async def write_bytes(self, writer: Any, conn: Any, *args: Any, **kwargs: Any) -> Any:
        gate = _GATE.get()
        if gate is None:
            return await super().write_bytes(writer, conn, *args, **kwargs)
        await gate()
        try:
            return await super().write_bytes(writer, conn, *args, **kwargs)
        finally:
            gate.written()

    def body_given(self) -> bool:
        return bool(getattr(self, "_body", None))


def _install_gate(inner: Any) -> bool:
    """Give the SDK's aiohttp transport a session whose requests are ``PacedRequest``s.

    The vendored transport builds its ``ClientSession`` on first use, or calls
    ``client`` when it is a factory: the same connector settings, one more
    argument. False (admit before the SDK's call instead) for any other transport.
    """
    if not (hasattr(inner, "client") and hasattr(inner, "limits") and inner.client is None):
        return False
    if getattr(inner, "uds", None) or getattr(inner, "proxy", None):
        return False
    limits = inner.limits

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            keepalive_timeout=limits.keepalive_expiry,
            ssl=inner.ssl_context,
            limit=limits.max_connections or 100,
        )
        return aiohttp.ClientSession(connector=connector, request_class=PacedRequest)

    inner.client = session
    return True


def _response(request: Any, answer: Answer) -> Any:
    """An httpx(2) response for the SDK, of the request's own httpx flavour."""
    module = importlib.import_module(type(request).__module__)
    return module.Response(
        answer.status, headers=answer.headers, content=answer.body, request=request
    )


class ConnectionFailed(ConnectionError):
    """A request could not reach the provider; says which host and why."""


def _connection_error(exc: BaseException, request: Any, job: Any) -> BaseException:
    """The exception to raise for a failed connection: the host and the real cause in its text.

    The SDK's aiohttp transport maps a refused connection to ``ConnectTimeout``,
    which the SDK reports as "Request timed out."; walking the chain of causes
    finds what happened.
    """
    cause: BaseException | None = exc
    refused = unresolved = False
    detail = f"{type(exc).__name__}: {exc}"
    seen = 0
    while cause is not None and seen < 10:
        os_error = getattr(cause, "os_error", None)
        for error in (cause, os_error):
            if isinstance(error, ConnectionRefusedError):
                refused = True
            elif isinstance(error, socket.gaierror) and error.errno in _NO_SUCH_NAME:
                unresolved = True
        if os_error is not None and (refused or unresolved):
            detail = f"{type(cause).__name__}: {cause}"
        cause = cause.__cause__ or cause.__context__
        seen += 1
    host = host_of(request)
    if refused or unresolved:
        # A name that does not exist is as final as a port nobody listens on (a
        # temporary failure of the resolver, EAI_AGAIN, is retried like a timeout).
        text = (
            f"connection refused by {host} ({detail})"
            if refused
            else f"cannot resolve {host}: no such host name ({detail})"
        )
        job.connection_refused(f"{text}; is base_url right and the server up?")
        return ConnectionFailed(text)
    if isinstance(exc, Exception) and "timeout" in type(exc).__name__.lower():
        return exc  # the SDK turns it into APITimeoutError, which is retried
    return ConnectionFailed(f"cannot reach {host} ({detail})")


class LoopClients:
    """The clients opened for one event loop; ``aclose()`` them before the loop ends."""

    __slots__ = ("_batcher", "_clients", "_job", "_stats", "_transports")

    def __init__(self, job: Any = None, stats: Any = None, batcher: Batcher | None = None) -> None:
        self._clients: list[tuple[Provider, Any]] = []
        self._transports: list[JobTransport] = []
        self._job = job
        self._stats = stats
        self._batcher = batcher

    def localize(
        self, runnable: Any, *, timeout: float | None = None, service_tier: str | None = None
    ) -> tuple[Any, bool]:
        """A copy of ``runnable`` whose chat models use clients owned by this loop.

        ``timeout``: seconds per request; None keeps a model's own ``timeout=`` and
        gives the others ``DEFAULT_REQUEST_TIMEOUT`` (``FLEX_REQUEST_TIMEOUT`` for a
        model that asks for Flex processing, itself or by ``.bind(service_tier=)``, as
        OpenAI advises). ``service_tier``: set on every OpenAI model of the copy, and on
        its bindings, whose keyword would win (None: each keeps its own; other providers
        have no such tier).

        Returns the copy and whether every chat model in it now sends through the
        job's transport (if not, usage is read from LangChain's callbacks instead).
        """
        untapped = False

        def visit(obj: Any) -> Any:
            nonlocal untapped
            if isinstance(obj, RunnableBinding) and provider_of(obj.bound) is OPENAI:
                tier = service_tier or obj.kwargs.get("service_tier")
                if tier is not None and tier != obj.kwargs.get("service_tier"):
                    obj = obj.model_copy(update={"kwargs": {**obj.kwargs, "service_tier": tier}})
                local = self._local_model(OPENAI, obj.bound, timeout=timeout, service_tier=tier)
                if local is None:
                    untapped = True
                    return obj
                return obj.model_copy(update={"bound": local})
            provider = provider_of(obj)
            if provider is not None:
                local = self._local_model(provider, obj, timeout=timeout, service_tier=service_tier)
                if local is None:  # the user's own client: only the tier is set on a copy
                    untapped = True
                    if service_tier is None or obj.service_tier == service_tier:
                        return obj
                    return obj.model_copy(update={"service_tier": service_tier})
                return local
            if is_configurable_model(obj):
                return LocalConfigurable(obj, self, timeout, service_tier)
            if isinstance(obj, BaseChatModel):
                untapped = True
            return NotImplemented

        local = rewrite(runnable, visit)
        models = find(local, lambda x: isinstance(x, BaseChatModel | LocalConfigurable))
        if not models:
            untapped = True  # models hidden in Python code, or built at run time
        return local, not untapped

    def _local_model(
        self, provider: Provider, model: Any, *, timeout: float | None, service_tier: str | None
    ) -> Any | None:
        """The loop's copy of ``model``; None when its requests cannot pass the job's
        transport (it has the user's own client): then it is used as it is."""

        def wrap(inner: Any) -> Any:
            if self._job is None:
                return inner
            transport = JobTransport(
                inner, self._job, self._stats, self._batcher, provider=provider
            )
            self._transports.append(transport)
            return transport

        built = provider.local_model(model, wrap=wrap, timeout=timeout, service_tier=service_tier)
        if built is None:
            return None
        local, client = built
        self._clients.append((provider, client))
        return local

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for provider, client in clients:
            await provider.close(client)
        transports, self._transports = self._transports, []
        for transport in transports:
            transport.forget()


class LocalConfigurable(Runnable[Any, Any]):
    """A configurable ``init_chat_model`` whose models use this loop's clients.

    It builds a chat model per call from its configuration (with
    langchain-openai's process-wide default client, which belongs to another
    loop); here each distinct configuration is built once per loop and
    localized like any other model.
    """

    def __init__(
        self,
        inner: Any,
        clients: LoopClients,
        timeout: float | None,
        service_tier: str | None = None,
    ) -> None:
        self.inner = inner
        self.clients = clients
        self.timeout = timeout
        self.service_tier = service_tier
        self._built: dict[str, Any] = {}

    def _local(self, config: Any) -> Any:
        params = {**self.inner._default_config, **self.inner._model_params(config)}
        key = repr(sorted((k, repr(v)) for k, v in params.items()))
        local = self._built.get(key)
        if local is None:
            local, _ = self.clients.localize(
                self.inner._model(config), timeout=self.timeout, service_tier=self.service_tier
            )
            self._built[key] = local
        return local

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        return self.inner.invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        return await self._local(config).ainvoke(input, config=config, **kwargs)


def _as_flex(request: Any, body: bytes) -> tuple[Any, bytes]:
    """``request`` (an OpenAI chat request) asking for Flex processing, with OpenAI's
    advised timeout (``FLEX_REQUEST_TIMEOUT``) for its reads."""
    data = json.loads(body)
    data["service_tier"] = "flex"
    flex_body = json.dumps(data, separators=(",", ":")).encode()
    headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
    timeout = dict(request.extensions.get("timeout") or {})
    if timeout:
        timeout["read"] = max(timeout.get("read") or 0.0, FLEX_REQUEST_TIMEOUT)
    flex = type(request)(  # the SDK's httpx flavour (see _response)
        request.method,
        str(request.url),
        headers=headers,
        content=flex_body,
        extensions={**request.extensions, "timeout": timeout} if timeout else request.extensions,
    )
    return flex, flex_body
