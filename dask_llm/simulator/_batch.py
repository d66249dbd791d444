"""OpenAI's Batch API and the Files API under it, answered like the online endpoint.

Design, and why:

* Files live in memory (``POST /v1/files`` reads the multipart body with
  aiohttp's own reader, in chunks, refusing more than OpenAI's 512 MB).
* A batch's whole life is a function of time, fixed when it is created: the
  input file is parsed and validated at once (the verdict is revealed only
  after ``batch_validation_delay``), then line ``i`` of ``n`` completes at
  ``in_progress_at + batch_delay * (i + 1) / n``, then the batch finalizes for
  ``batch_finalize_delay``. Expiry (``batch_expire_after`` seconds in
  progress) and cancellation (the moment ``cancel`` was called) only cut that
  timeline short. Status, ``request_counts`` and timestamps are computed from
  the clock on each request that looks at a batch, so there is no background
  task per batch, nothing to cancel on shutdown, and the stats can be computed
  at any moment.
* Answers are composed once, when a batch has ended (``completed``,
  ``expired``, ``cancelled``) and is first looked at, in chunks that yield to
  the event loop so online traffic keeps flowing. Each line is answered by
  ``SimulatorApp.answer_offline``: the same deterministic answer and usage the
  online endpoint gives the same body, or the same 400/404 error body for a
  body it would refuse. Those go to the error file with their status code, as
  OpenAI does; so do lines hit by ``batch_line_failure_rate`` (a 500,
  decided per line when the batch is created, from a generator seeded by
  ``seed`` and the batch's number). Lines not run before an expiry or a cancel
  go to the error file with ``response: null`` and an ``error`` of code
  ``batch_expired`` / ``batch_cancelled`` (the codes of OpenAI's
  ``BatchRequestOutput.error``).
* ``request_counts``: ``total`` is the number of lines once validated (0 while
  validating or when validation failed); ``completed`` counts lines answered
  200 so far, ``failed`` lines answered with an error status so far. Lines
  that expired or were cancelled are in neither, so ``total - completed -
  failed`` is the number of lines that never ran.
* Batch lines never touch the online limits, faults, latency or stats: the
  Batch API has its own pool. Their counters are ``batch_*`` in the stats.
* ``batch_duplicate_lines`` counts money paid twice: a line answered 200 whose
  body (in canonical form) or ``custom_id`` matches a line answered 200 in an
  earlier-created batch. Lines that failed, expired or were cancelled were not
  paid for, so resubmitting them is not a duplicate.

Validation errors (``errors.data``, each ``{code, message, param, line}``,
lines numbered from 1, at most ``MAX_LISTED_ERRORS`` listed): a file over
``batch_max_bytes`` (``file_too_large``), an empty file (``empty_file``),
more than ``batch_max_lines`` requests (``too_many_requests``), and per line:
``invalid_json_line`` (not a JSON object), ``missing_required_parameter``
(no ``custom_id``, ``method``, ``url`` or ``body``), ``invalid_type``
(``custom_id`` not a non-empty string, ``body`` not an object),
``invalid_method`` (not POST), ``invalid_url`` (not the batch's endpoint),
``duplicate_custom_id``. Blank lines are skipped.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from dask_llm.simulator._http import error, error_body, respond

if TYPE_CHECKING:
    from dask_llm.simulator._app import SimulatorApp

ENDPOINT = "/v1/chat/completions"
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_LISTED_ERRORS = 1000
_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_ANSWERED = ("completed", "expired", "cancelled")
_YIELD_EVERY = 256
SERVER_ERROR = error_body(
    "The server had an error while processing your request. Sorry about that!",
    type_="server_error",
)


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class Line:
    custom_id: str
    body: dict[str, Any]
    key: bytes  # the body's answer key (canonical form)
    ok: bool  # answered 200 when it runs (not refused, not a drawn failure)
    injected: bool  # a drawn failure: a 500


@dataclass
class Batch:
    id: str
    number: int
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created: float  # monotonic
    created_unix: float
    lines: list[Line]
    errors: list[dict[str, Any]]
    t_valid: float
    t_done: float
    t_expire: float
    finalize: float
    cancel_delay: float
    failed_before: list[int] = field(default_factory=list)  # failures among the first i lines
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, Any] | None = None
    answered: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        failed = [0]
        for line in self.lines:
            failed.append(failed[-1] + (not line.ok))
        self.failed_before = failed

    @property
    def expires(self) -> bool:
        """Processing outlasts the expiry: the batch expires at ``t_expire``."""
        return not self.errors and self.t_expire < self.t_done

    def stop(self) -> float:
        """When processing stops short (expiry, cancel), or inf."""
        stop = self.t_expire if self.expires else math.inf
        if self.cancel_at is not None:
            stop = min(stop, self.cancel_at)
        return stop

    def status(self, now: float) -> str:
        if self.cancel_at is not None:
            return "cancelling" if now < self.cancel_at + self.cancel_delay else "cancelled"
        if now < self.t_valid:
            return "validating"
        if self.errors:
            return "failed"
        if self.expires and now >= self.t_expire:
            return "expired"
        if now < self.t_done:
            return "in_progress"
        if now < self.t_done + self.finalize:
            return "finalizing"
        return "completed"

    def done(self, now: float) -> int:
        """Lines finished by ``now`` (a line finishes at its time, unless processing stopped)."""
        x = min(now, self.stop())
        if self.errors or x < self.t_valid:
            return 0
        n = len(self.lines)
        span = self.t_done - self.t_valid
        if x >= self.t_done or span <= 0:
            return n
        return min(n, int((x - self.t_valid) * n / span + 1e-9))

    def submitted(self, now: float) -> bool:
        """Validated and put in progress (not cancelled while validating)."""
        return (
            not self.errors
            and now >= self.t_valid
            and (self.cancel_at is None or self.cancel_at >= self.t_valid)
        )

    def counts(self, now: float) -> dict[str, int]:
        if not self.submitted(now):
            return {"total": 0, "completed": 0, "failed": 0}
        done = self.done(now)
        failed = self.failed_before[done]
        return {"total": len(self.lines), "completed": done - failed, "failed": failed}

    def unix(self, t: float) -> int:
        return int(self.created_unix + (t - self.created))

    def to_json(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        unix = self.unix
        submitted = self.submitted(now)
        finalized = (
            submitted
            and not self.expires
            and now >= self.t_done
            and (self.cancel_at is None or self.cancel_at >= self.t_done)
        )
        model = self.lines[0].body.get("model") if self.lines and submitted else None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "model": model if isinstance(model, str) else None,
            "errors": ({"object": "list", "data": self.errors} if status == "failed" else None),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_unix),
            "in_progress_at": unix(self.t_valid) if submitted else None,
            "expires_at": unix(self.t_expire),
            "finalizing_at": unix(self.t_done) if finalized else None,
            "completed_at": unix(self.t_done + self.finalize) if status == "completed" else None,
            "failed_at": unix(self.t_valid) if status == "failed" else None,
            "expired_at": unix(self.t_expire) if status == "expired" else None,
            "cancelling_at": unix(self.cancel_at) if self.cancel_at is not None else None,
            "cancelled_at": (
                unix(self.cancel_at + self.cancel_delay)
                if self.cancel_at is not None and status == "cancelled"
                else None
            ),
            "request_counts": self.counts(now),
            "metadata": self.metadata,
            "usage": self.usage,
        }


def _line_error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


class BatchAPI:
    """Files and batches of one simulator, and their HTTP handlers."""

    def __init__(self, app: SimulatorApp) -> None:
        self.app = app
        self.config = app.config
        self.reset()

    def reset(self) -> None:
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.files_uploaded = 0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self.upload)
        router.add_get("/v1/files", self.list_files)
        router.add_get("/v1/files/{id}", self.get_file)
        router.add_delete("/v1/files/{id}", self.delete_file)
        router.add_get("/v1/files/{id}/content", self.file_content)
        router.add_post("/v1/batches", self.create)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{id}", self.retrieve)
        router.add_post("/v1/batches/{id}/cancel", self.cancel)

    # -- stats --------------------------------------------------------------------------
    def counters(self, now: float) -> dict[str, int]:
        """The ``batch_*`` counters of ``/sim/stats`` at ``now`` (a pure function of time)."""
        statuses = {s: 0 for s in _TERMINAL}
        submitted = ok = failed = expired = cancelled = duplicates = 0
        paid_bodies: set[bytes] = set()
        paid_ids: set[str] = set()
        for batch in self.batches.values():
            status = batch.status(now)
            if status in statuses:
                statuses[status] += 1
            if not batch.submitted(now):
                continue
            n = len(batch.lines)
            submitted += n
            counts = batch.counts(now)
            ok += counts["completed"]
            failed += counts["failed"]
            done = counts["completed"] + counts["failed"]
            if status == "expired":
                expired += n - done
            elif status in ("cancelling", "cancelled"):
                cancelled += n - done
            paid = [line for line in batch.lines[: batch.done(now)] if line.ok]
            duplicates += sum(
                1 for line in paid if line.key in paid_bodies or line.custom_id in paid_ids
            )
            paid_bodies.update(line.key for line in paid)
            paid_ids.update(line.custom_id for line in paid)
        return {
            "batch_files_uploaded": self.files_uploaded,
            "batches_created": len(self.batches),
            "batches_completed": statuses["completed"],
            "batches_failed": statuses["failed"],
            "batches_expired": statuses["expired"],
            "batches_cancelled": statuses["cancelled"],
            "batch_lines_submitted": submitted,
            "batch_lines_ok": ok,
            "batch_lines_failed": failed,
            "batch_lines_expired": expired,
            "batch_lines_cancelled": cancelled,
            "batch_duplicate_lines": duplicates,
        }

    # -- files --------------------------------------------------------------------------
    def _new_file(self, filename: str, purpose: str, data: bytes, created_at: int) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, created_at)
        self.files[stored.id] = stored
        return stored

    def _no_file(self, file_id: str, param: str = "id") -> web.Response:
        return error(
            404, f"No such File object: {file_id}", type_="invalid_request_error", param=param
        )

    async def upload(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        if not request.content_type.startswith("multipart/"):
            return error(
                400,
                "Invalid Content-Type header; expected multipart/form-data.",
                type_="invalid_request_error",
            )
        purpose: str | None = None
        filename: str | None = None
        data: bytes | None = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload"
                chunks: list[bytes] = []
                size = 0
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        return error(
                            413,
                            f"File is too large: the maximum is {MAX_FILE_BYTES} bytes.",
                            type_="invalid_request_error",
                            param="file",
                        )
                    chunks.append(chunk)
                data = b"".join(chunks)
            else:
                await part.release()
        if data is None or filename is None:
            return error(
                400,
                "Missing required parameter: 'file'.",
                type_="invalid_request_error",
                param="file",
                code="missing_required_parameter",
            )
        if purpose is None:
            return error(
                400,
                "Missing required parameter: 'purpose'.",
                type_="invalid_request_error",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in _PURPOSES:
            return error(
                400,
                f"Invalid value for 'purpose': {purpose!r}. Expected one of "
                f"{', '.join(_PURPOSES)}.",
                type_="invalid_request_error",
                param="purpose",
                code="invalid_value",
            )
        if purpose == "batch" and not filename.endswith(".jsonl"):
            return error(
                400,
                "Invalid file format for Batch API. Must be .jsonl",
                type_="invalid_request_error",
                param="file",
            )
        stored = self._new_file(filename, purpose, data, int(time.time()))
        self.files_uploaded += 1
        return respond(200, stored.to_json())

    async def list_files(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        purpose = request.query.get("purpose")
        files = [f for f in reversed(self.files.values()) if purpose in (None, f.purpose)]
        if request.query.get("order") == "asc":
            files.reverse()
        return self._page(request, [f.to_json() for f in files], default_limit=10_000)

    async def get_file(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        stored = self.files.get(request.match_info["id"])
        if stored is None:
            return self._no_file(request.match_info["id"])
        return respond(200, stored.to_json())

    async def delete_file(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        stored = self.files.pop(request.match_info["id"], None)
        if stored is None:
            return self._no_file(request.match_info["id"])
        return respond(200, {"id": stored.id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        stored = self.files.get(request.match_info["id"])
        if stored is None:
            return self._no_file(request.match_info["id"])
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # -- batches ------------------------------------------------------------------------
    def _no_batch(self, batch_id: str) -> web.Response:
        return error(
            404, f"No batch found with id '{batch_id}'.", type_="invalid_request_error", param="id"
        )

    async def create(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        if self.config.batch_create_delay:
            await asyncio.sleep(self.config.batch_create_delay)
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(
                400,
                "We could not parse the JSON body of your request.",
                type_="invalid_request_error",
            )
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return error(
                    400,
                    f"Missing required parameter: '{name}'.",
                    type_="invalid_request_error",
                    param=name,
                    code="missing_required_parameter",
                )
        if body["endpoint"] != ENDPOINT:
            return error(
                400,
                f"Invalid value for 'endpoint': {body['endpoint']!r}. The simulator's Batch API "
                f"supports {ENDPOINT} only.",
                type_="invalid_request_error",
                param="endpoint",
                code="invalid_value",
            )
        if body["completion_window"] != "24h":
            return error(
                400,
                f"Invalid value for 'completion_window': {body['completion_window']!r}. "
                "Supported values are: '24h'.",
                type_="invalid_request_error",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            return error(
                400,
                "Invalid 'metadata': at most 16 string pairs, keys up to 64 characters, "
                "values up to 512.",
                type_="invalid_request_error",
                param="metadata",
                code="invalid_value",
            )
        stored = self.files.get(body["input_file_id"])
        if stored is None:
            return self._no_file(body["input_file_id"], "input_file_id")
        if stored.purpose != "batch":
            return error(
                400,
                f"The input file {stored.id} must have purpose 'batch', not {stored.purpose!r}.",
                type_="invalid_request_error",
                param="input_file_id",
                code="invalid_value",
            )
        now = time.monotonic()
        number = len(self.batches)
        lines, errors = await self._validate(stored.data, number)
        cfg = self.config
        t_valid = now + cfg.batch_validation_delay
        t_expire = (
            t_valid + cfg.batch_expire_after
            if cfg.batch_expire_after is not None
            and (cfg.batch_expire_count is None or number < cfg.batch_expire_count)
            else now + 24 * 3600.0
        )
        batch = Batch(
            id=f"batch_{uuid.uuid4().hex}",
            number=number,
            input_file_id=stored.id,
            completion_window="24h",
            metadata=metadata,
            created=now,
            created_unix=time.time(),
            lines=lines,
            errors=errors,
            t_valid=t_valid,
            t_done=t_valid + cfg.batch_delay,
            t_expire=t_expire,
            finalize=cfg.batch_finalize_delay,
            cancel_delay=cfg.batch_cancel_delay,
        )
        self.batches[batch.id] = batch
        return respond(200, batch.to_json(now))

    async def _validate(self, data: bytes, number: int) -> tuple[list[Line], list[dict[str, Any]]]:
        """The requests of an input file, or the errors that fail the batch."""
        cfg = self.config
        if len(data) > cfg.batch_max_bytes:
            message = (
                f"The batch input file is larger than the {cfg.batch_max_bytes} bytes maximum."
            )
            return [], [_line_error("file_too_large", message, None, None)]
        raw_lines = data.split(b"\n")
        numbered = [(k, raw) for k, raw in enumerate(raw_lines, 1) if raw.strip()]
        if not numbered:
            return [], [_line_error("empty_file", "The batch input file is empty.", None, None)]
        if len(numbered) > cfg.batch_max_lines:
            message = (
                f"The batch input file has {len(numbered)} requests; the maximum is "
                f"{cfg.batch_max_lines}."
            )
            return [], [_line_error("too_many_requests", message, None, None)]
        errors: list[dict[str, Any]] = []
        requests: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for count, (k, raw) in enumerate(numbered, 1):
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            problem = self._check_line(raw, seen)
            if isinstance(problem, dict):
                problem["line"] = k
                errors.append(problem)
            else:
                requests.append(problem)
        if errors:
            return [], errors[:MAX_LISTED_ERRORS]
        rng = random.Random(f"{cfg.seed}:batch:{number}")
        rate = cfg.batch_line_failure_rate
        app = self.app
        lines = []
        for count, (custom_id, body) in enumerate(requests, 1):
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            drawn = rate > 0 and rng.random() < rate  # one draw per line, in order
            refused = app.refusal(body) is not None
            injected = drawn and not refused  # a refused body is refused, not failed
            key = app.answer_key(body)
            ok = not (injected or refused)
            lines.append(Line(custom_id, body, key, ok=ok, injected=injected))
        return lines, []

    def _check_line(self, raw: bytes, seen: set[str]) -> dict[str, Any] | tuple[str, Any]:
        """``(custom_id, body)`` of a valid line, else its error (without the line number)."""
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return _line_error(
                "invalid_json_line", "This line is not parseable as valid JSON.", None, None
            )
        for name in ("custom_id", "method", "url", "body"):
            if name not in obj:
                return _line_error(
                    "missing_required_parameter",
                    f"Missing required parameter: '{name}'.",
                    name,
                    None,
                )
        custom_id = obj["custom_id"]
        if not isinstance(custom_id, str) or not custom_id:
            message = "Invalid 'custom_id': expected a non-empty string."
            return _line_error("invalid_type", message, "custom_id", None)
        if obj["method"] != "POST":
            return _line_error(
                "invalid_method",
                f"Invalid 'method': {obj['method']!r}. Only POST is supported.",
                "method",
                None,
            )
        if obj["url"] != ENDPOINT:
            return _line_error(
                "invalid_url",
                f"The URL provided for this request ({obj['url']!r}) does not match the batch "
                f"endpoint ({ENDPOINT!r}).",
                "url",
                None,
            )
        if not isinstance(obj["body"], dict):
            return _line_error("invalid_type", "Invalid 'body': expected an object.", "body", None)
        if custom_id in seen:
            return _line_error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The "
                "custom_id parameter must be unique for each individual request in a batch.",
                "custom_id",
                None,
            )
        seen.add(custom_id)
        return custom_id, obj["body"]

    async def _settle(self, batch: Batch, now: float) -> None:
        """Write the output and error files of a batch that has ended (once)."""
        if batch.answered or batch.status(now) not in _ANSWERED:
            return
        async with batch.lock:
            if batch.answered:
                return
            await self._answer(batch)
            batch.answered = True

    async def _answer(self, batch: Batch) -> None:
        done = batch.done(math.inf)
        outputs: list[bytes] = []
        failures: list[bytes] = []
        prompt = completion = 0
        app = self.app
        for k, line in enumerate(batch.lines):
            if k and k % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            record: dict[str, Any] = {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": line.custom_id,
                "response": None,
                "error": None,
            }
            if k >= done:
                if batch.cancel_at is not None and batch.cancel_at <= batch.stop():
                    record["error"] = {
                        "code": "batch_cancelled",
                        "message": "The batch was cancelled before this request executed.",
                    }
                else:
                    record["error"] = {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion "
                        "window expired.",
                    }
                failures.append(json.dumps(record).encode())
                continue
            body: dict[str, Any]
            if line.injected:
                status, body = 500, SERVER_ERROR
            else:
                status, body = app.answer_offline(line.body)
            record["response"] = {
                "status_code": status,
                "request_id": uuid.uuid4().hex,
                "body": body,
            }
            if status == 200:
                prompt += body["usage"]["prompt_tokens"]
                completion += body["usage"]["completion_tokens"]
                outputs.append(json.dumps(record).encode())
            else:
                failures.append(json.dumps(record).encode())
        ended = batch.stop()
        if ended == math.inf:
            ended = batch.t_done + batch.finalize
        created_at = batch.unix(ended)
        if outputs:
            batch.output_file_id = self._new_file(
                f"{batch.id}_output.jsonl", "batch_output", b"\n".join(outputs) + b"\n", created_at
            ).id
        if failures:
            batch.error_file_id = self._new_file(
                f"{batch.id}_error.jsonl", "batch_output", b"\n".join(failures) + b"\n", created_at
            ).id
        batch.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    async def retrieve(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._no_batch(request.match_info["id"])
        now = time.monotonic()
        await self._settle(batch, now)
        return respond(200, batch.to_json(now))

    async def cancel(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._no_batch(request.match_info["id"])
        now = time.monotonic()
        status = batch.status(now)
        if status not in ("validating", "in_progress", "finalizing"):
            return error(
                409,
                f"Cannot cancel a batch with status '{status}'.",
                type_="invalid_request_error",
            )
        batch.cancel_at = now
        await self._settle(batch, now)
        return respond(200, batch.to_json(now))

    async def list_batches(self, request: web.Request) -> web.Response:
        denied = self.app.unauthorized(request)
        if denied is not None:
            return denied
        now = time.monotonic()
        batches = list(reversed(self.batches.values()))
        for batch in batches:
            await self._settle(batch, now)
        return self._page(request, [b.to_json(now) for b in batches], default_limit=20)

    def _page(
        self, request: web.Request, items: list[dict[str, Any]], *, default_limit: int
    ) -> web.Response:
        """A cursor page: ``limit`` items after the one with id ``after``, newest first."""
        try:
            limit = int(request.query.get("limit", default_limit))
        except ValueError:
            limit = 0
        if not 1 <= limit <= max(100, default_limit):
            return error(
                400,
                f"Invalid 'limit': expected an integer between 1 and {max(100, default_limit)}.",
                type_="invalid_request_error",
                param="limit",
                code="invalid_value",
            )
        after = request.query.get("after")
        start = 0
        if after is not None:
            ids = [item["id"] for item in items]
            start = ids.index(after) + 1 if after in ids else len(items)
        page = items[start : start + limit]
        return respond(
            200,
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(items),
            },
        )
