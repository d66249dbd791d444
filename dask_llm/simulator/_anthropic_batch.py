"""Anthropic's Message Batches API (``/v1/messages/batches``), answered like ``/v1/messages``.

The same design as the OpenAI Batch API's (``_batch``): a batch's whole life
is a function of time fixed when it is created, computed from the clock on
each request that looks at it (no background task). Request ``i`` of ``n``
completes at ``created + batch_delay * (i + 1) / n``; ``batch_expire_after``
(None: never; only the first ``batch_expire_count`` batches when set) and
``cancel`` cut that short. A batch is ``in_progress``, ``canceling`` for
``batch_cancel_delay`` after a cancel, then ``ended``; its ``results_url``
then serves JSONL, one line per request in the order given:
``{"custom_id", "result": {"type": "succeeded", "message": ...}}``, or
``errored`` (the error body ``/v1/messages`` would give, or a 500
``api_error`` for ``batch_line_failure_rate``), ``canceled``, ``expired``.
Answers are ``MessagesAPI.answer_offline``: what the online endpoint gives
the same body, minus limits, latency and faults.

Counters (``/sim/stats``): ``message_batches_created``,
``message_batch_requests`` (submitted), ``message_batch_succeeded``, and
``message_batch_duplicates``: requests answered ``succeeded`` whose params
(in canonical form) or ``custom_id`` match one that succeeded in an
earlier-created batch (money paid twice).
"""

from __future__ import annotations

import datetime
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dask_llm.simulator._http import JSON

if TYPE_CHECKING:
    from dask_llm.simulator._anthropic import MessagesAPI
    from dask_llm.simulator._app import SimulatorApp

_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
MAX_REQUESTS = 100_000


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=JSON)


@dataclass
class MessageBatch:
    id: str
    number: int
    created: float  # monotonic
    created_unix: float
    requests: list[tuple[str, Any]]  # (custom_id, params)
    delay: float
    expire_after: float | None
    failing: frozenset[int]
    cancelled_at: float | None = None
    results: list[dict[str, Any]] | None = field(default=None, repr=False)

    def stop(self) -> float:
        """When the last request runs, or processing was cut short."""
        end = self.created + self.delay
        if self.expire_after is not None:
            end = min(end, self.created + self.expire_after)
        if self.cancelled_at is not None:
            end = min(end, self.cancelled_at)
        return end

    def done(self, now: float) -> int:
        """Requests run by ``now``."""
        n = len(self.requests)
        if n == 0:
            return 0
        t = min(now, self.stop())
        if self.delay <= 0:
            return n if t >= self.created else 0
        return max(0, min(n, int((t - self.created) / self.delay * n + 1e-9)))

    def ended_at(self, cancel_delay: float) -> float:
        if self.cancelled_at is not None and self.cancelled_at < self.created + self.delay:
            return self.cancelled_at + cancel_delay
        return self.stop()

    def status(self, now: float, cancel_delay: float) -> str:
        if now >= self.ended_at(cancel_delay):
            return "ended"
        return "canceling" if self.cancelled_at is not None else "in_progress"

    def expired(self) -> bool:
        return self.expire_after is not None and self.stop() == self.created + self.expire_after


def _iso(unix: float) -> str:
    when = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


class MessageBatches:
    """``/v1/messages/batches`` of one simulated provider."""

    def __init__(self, app: SimulatorApp, messages: MessagesAPI) -> None:
        self.app = app
        self.messages = messages
        self.reset()

    def reset(self) -> None:
        self._batches: dict[str, MessageBatch] = {}
        self._created = 0
        self._requests = 0
        self._succeeded = 0
        self._duplicates = 0
        self._paid_bodies: dict[bytes, int] = {}  # canonical params -> batch number
        self._paid_ids: dict[str, int] = {}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages/batches", self.create)
        router.add_get("/v1/messages/batches", self.list_batches)
        router.add_get("/v1/messages/batches/{id}", self.retrieve)
        router.add_post("/v1/messages/batches/{id}/cancel", self.cancel)
        router.add_get("/v1/messages/batches/{id}/results", self.results)

    def counters(self) -> dict[str, int]:
        return {
            "message_batches_created": self._created,
            "message_batch_requests": self._requests,
            "message_batch_succeeded": self._succeeded,
            "message_batch_duplicates": self._duplicates,
        }

    def _denied(self, request: web.Request) -> web.Response | None:
        key = self.app.config.api_key
        if key is not None and request.headers.get("x-api-key") != key:
            return _error(401, "authentication_error", "invalid x-api-key")
        return None

    async def create(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            payload = json.loads(await request.read())
            requests = payload["requests"]
            assert isinstance(requests, list) and requests
            pairs = [(str(r["custom_id"]), r["params"]) for r in requests]
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "invalid_request_error", "requests: a non-empty list required")
        ids = [c for c, _ in pairs]
        if len(set(ids)) != len(ids):
            return _error(400, "invalid_request_error", "custom_id must be unique in a batch")
        if len(pairs) > MAX_REQUESTS:
            return _error(400, "invalid_request_error", f"at most {MAX_REQUESTS} requests")
        cfg = self.app.config
        self._created += 1
        number = self._created
        self._requests += len(pairs)
        rng = random.Random(f"{cfg.seed}-message-batch-{number}")
        failing = frozenset(
            i for i in range(len(pairs)) if rng.random() < cfg.batch_line_failure_rate
        )
        expires = cfg.batch_expire_after is not None and (
            cfg.batch_expire_count is None or number <= cfg.batch_expire_count
        )
        batch = MessageBatch(
            id=f"msgbatch_{uuid.uuid4().hex[:24]}",
            number=number,
            created=time.monotonic(),
            created_unix=time.time(),
            requests=pairs,
            delay=cfg.batch_delay,
            expire_after=cfg.batch_expire_after if expires else None,
            failing=failing,
        )
        self._batches[batch.id] = batch
        return web.json_response(self._json(batch, request, time.monotonic()))

    def _json(self, batch: MessageBatch, request: web.Request, now: float) -> dict[str, Any]:
        cancel_delay = self.app.config.batch_cancel_delay
        status = batch.status(now, cancel_delay)
        n = len(batch.requests)
        done = batch.done(now)
        failed = len([i for i in batch.failing if i < done])
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if status == "ended":
            if batch.cancelled_at is not None and not batch.expired():
                counts["canceled"] = n - done
            else:
                counts["expired"] = n - done
            counts["succeeded"] = done - failed
            counts["errored"] = failed
        else:
            counts["processing"] = n - done
            counts["succeeded"] = done - failed
            counts["errored"] = failed
        ended = status == "ended"
        base = f"{request.scheme}://{request.host}"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": _iso(batch.created_unix),
            "expires_at": _iso(batch.created_unix + 86_400),
            "ended_at": _iso(batch.created_unix + batch.ended_at(cancel_delay) - batch.created)
            if ended
            else None,
            "cancel_initiated_at": _iso(batch.created_unix + batch.cancelled_at - batch.created)
            if batch.cancelled_at is not None
            else None,
            "archived_at": None,
            "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def _find(self, request: web.Request) -> MessageBatch | web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        batch = self._batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found_error", f"no batch {request.match_info['id']}")
        return batch

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        return web.json_response(self._json(batch, request, time.monotonic()))

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.monotonic()
        if batch.cancelled_at is None and batch.status(now, 0.0) == "in_progress":
            batch.cancelled_at = now
        return web.json_response(self._json(batch, request, now))

    async def list_batches(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        now = time.monotonic()
        batches = sorted(self._batches.values(), key=lambda b: -b.number)
        data = [self._json(b, request, now) for b in batches]
        return web.json_response(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def results(self, request: web.Request) -> web.Response:
        batch = self._find(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.monotonic()
        if batch.status(now, self.app.config.batch_cancel_delay) != "ended":
            return _error(400, "invalid_request_error", "batch has not ended")
        if batch.results is None:
            batch.results = self._answer(batch, now)
        text = "".join(json.dumps(r) + "\n" for r in batch.results)
        return web.Response(body=text.encode(), content_type="application/binary")

    def _answer(self, batch: MessageBatch, now: float) -> list[dict[str, Any]]:
        done = batch.done(now)
        cut = "expired" if batch.expired() else "canceled"
        out = []
        for i, (custom_id, params) in enumerate(batch.requests):
            if i >= done:
                result: dict[str, Any] = {"type": cut}
            elif i in batch.failing:
                result = {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": "api_error", "message": "x"}},
                }
            else:
                status, body = self.messages.answer_offline(params)
                if status == 200:
                    result = {"type": "succeeded", "message": body}
                    self._paid(batch, custom_id, params)
                else:
                    result = {"type": "errored", "error": body}
            out.append({"custom_id": custom_id, "result": result})
        return out

    def _paid(self, batch: MessageBatch, custom_id: str, params: Any) -> None:
        self._succeeded += 1
        canonical = _canonical(params).encode()
        earlier = [self._paid_bodies.get(canonical), self._paid_ids.get(custom_id)]
        if any(n is not None and n < batch.number for n in earlier):
            self._duplicates += 1
        self._paid_bodies.setdefault(canonical, batch.number)
        self._paid_ids.setdefault(custom_id, batch.number)
