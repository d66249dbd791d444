"""The simulator's Batch API and Files API, driven through the real openai SDK (sync and async)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
import pytest
from openai.types import Batch

from dask_llm.simulator import Simulator
from tests.conftest import API_KEY

ENDPOINT = "/v1/chat/completions"
FAST = {
    "batch_validation_delay": 0.05,
    "batch_delay": 0.3,
    "batch_finalize_delay": 0.05,
    "batch_cancel_delay": 0.05,
}
TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_FIELDS = {
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
}


def body(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"A tasting note for wine {i}."}],
        **extra,
    }


def line(custom_id: str, request: dict[str, Any], url: str = ENDPOINT) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": request}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def client(sim: Simulator, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, **kwargs)


def submit(c: openai.OpenAI, data: bytes, **kwargs: Any) -> Batch:
    uploaded = c.files.create(file=("requests.jsonl", data), purpose="batch")
    return c.batches.create(
        input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h", **kwargs
    )


def wait(
    c: openai.OpenAI, batch_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 10.0
) -> tuple[Batch, list[Batch]]:
    """Poll every 20 ms until a status in ``until``; return the last batch and every poll."""
    polls: list[Batch] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = c.batches.retrieve(batch_id)
        polls.append(batch)
        if batch.status in until:
            return batch, polls
        time.sleep(0.02)
    raise AssertionError(f"batch still {polls[-1].status} after {timeout} s")


def read(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


@pytest.fixture
def batch_sim(make_simulator: Any) -> Simulator:
    sim: Simulator = make_simulator(**FAST)
    return sim


# -- the happy path ----------------------------------------------------------------------------
def test_upload_submit_poll_and_read_the_results(batch_sim: Simulator) -> None:
    rows = [line(f"row-{i}", body(i, max_tokens=30)) for i in range(8)]
    data = jsonl(rows)
    with client(batch_sim) as c:
        uploaded = c.files.create(file=("requests.jsonl", data), purpose="batch")
        assert uploaded.id.startswith("file-") and uploaded.object == "file"
        assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
            len(data),
            "requests.jsonl",
            "batch",
        )
        assert uploaded.status == "processed" and uploaded.created_at > 1_600_000_000
        assert c.files.retrieve(uploaded.id) == uploaded
        assert c.files.content(uploaded.id).content == data

        created = c.batches.create(
            input_file_id=uploaded.id,
            endpoint=ENDPOINT,
            completion_window="24h",
            metadata={"job": "wine-notes"},
        )
        raw = c.batches.with_raw_response.retrieve(created.id).http_response.json()
        assert set(raw) >= BATCH_FIELDS
        assert created.id.startswith("batch_") and created.object == "batch"
        assert created.status == "validating" and created.metadata == {"job": "wine-notes"}
        assert created.request_counts is not None and created.request_counts.total == 0
        assert created.output_file_id is None and created.in_progress_at is None

        done, polls = wait(c, created.id)
    statuses = [p.status for p in polls]
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert [s for s in order if s in statuses] == sorted(set(statuses), key=order.index)
    assert "in_progress" in statuses and statuses[-1] == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (8, 8)
    assert done.request_counts.failed == 0 and done.error_file_id is None and done.errors is None
    assert done.model == "gpt-4o-mini"
    assert done.in_progress_at is not None and done.finalizing_at is not None
    assert done.completed_at is not None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.failed_at is None and done.expired_at is None and done.cancelled_at is None

    with client(batch_sim) as c:
        output = read(c, done.output_file_id)
        out_file = c.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert out_file.purpose == "batch_output"
    assert [o["custom_id"] for o in output] == [f"row-{i}" for i in range(8)]
    for o in output:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        answer = o["response"]["body"]
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    usage = sum(o["response"]["body"]["usage"]["total_tokens"] for o in output)
    assert done.usage is not None and done.usage.total_tokens == usage

    stats = batch_sim.stats()
    assert stats["requests"] == 0, "batch lines are not online requests"
    assert stats["batch_files_uploaded"] == 1
    assert stats["batches_created"] == stats["batches_completed"] == 1
    assert stats["batch_lines_submitted"] == stats["batch_lines_ok"] == 8
    assert stats["batch_lines_failed"] == stats["batch_lines_expired"] == 0
    assert stats["batch_duplicate_lines"] == 0


def test_the_async_client_drives_the_same_flow(batch_sim: Simulator) -> None:
    async def main() -> tuple[Batch, list[dict[str, Any]], list[str]]:
        async with openai.AsyncOpenAI(
            base_url=batch_sim.base_url, api_key="sk-test", max_retries=0
        ) as c:
            uploaded = await c.files.create(
                file=("a.jsonl", jsonl([line(f"a{i}", body(i)) for i in range(5)])),
                purpose="batch",
            )
            batch = await c.batches.create(
                input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
            )
            while batch.status not in TERMINAL:
                await asyncio.sleep(0.02)
                batch = await c.batches.retrieve(batch.id)
            assert batch.output_file_id is not None
            content = await c.files.content(batch.output_file_id)
            listed = [b.id async for b in c.batches.list()]
            return batch, [json.loads(x) for x in content.text.splitlines()], listed

    batch, output, listed = asyncio.run(main())
    assert batch.status == "completed" and len(output) == 5
    assert listed == [batch.id]


def test_polling_sees_the_lines_complete_progressively(make_simulator: Any) -> None:
    sim = make_simulator(**{**FAST, "batch_delay": 1.0})
    with client(sim) as c:
        batch = submit(c, jsonl([line(f"p{i}", body(i)) for i in range(20)]))
        done, polls = wait(c, batch.id)
    completed = [p.request_counts.completed for p in polls if p.request_counts is not None]
    assert completed == sorted(completed)
    assert len({n for n in completed if 0 < n < 20}) >= 4
    assert done.request_counts is not None and done.request_counts.completed == 20
    in_progress = [p for p in polls if p.status == "in_progress"]
    assert all(p.request_counts and p.request_counts.total == 20 for p in in_progress)
    assert all(p.output_file_id is None for p in in_progress)


# -- identical to online -----------------------------------------------------------------------
WINE_SCHEMA = {
    "type": "object",
    "properties": {
        "grape": {"type": "string"},
        "score": {"type": "integer", "minimum": 80, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
    },
    "required": ["grape", "score", "tags"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "record_wine",
        "parameters": WINE_SCHEMA,
    },
}


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param(body("text"), id="text"),
        pytest.param(body("short", max_tokens=3), id="truncated"),
        pytest.param(body("json", response_format={"type": "json_object"}), id="json_object"),
        pytest.param(
            body(
                "schema",
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "Wine", "schema": WINE_SCHEMA, "strict": True},
                },
            ),
            id="json_schema",
        ),
        pytest.param(body("tool", tools=[TOOL], tool_choice="required"), id="tools"),
    ],
)
def test_a_line_gets_exactly_the_online_answer(
    batch_sim: Simulator, request_body: dict[str, Any]
) -> None:
    with client(batch_sim) as c:
        # Keys in another order than the SDK sends them: the answer does not depend on it.
        reordered = dict(reversed(list(request_body.items())))
        batch = submit(c, jsonl([line("only", reordered)]))
        done, _ = wait(c, batch.id)
        (output,) = read(c, done.output_file_id)
        online = c.chat.completions.with_raw_response.create(**request_body)
    assert output["response"]["body"] == online.http_response.json()


def test_lines_do_not_draw_on_the_online_limits(make_simulator: Any) -> None:
    sim = make_simulator(**FAST, rpm=60, tpm=6000)  # 1 request and 100 tokens per second online
    with client(sim) as c:
        batch = submit(c, jsonl([line(f"q{i}", body(i, max_tokens=80)) for i in range(30)]))
        done, _ = wait(c, batch.id)
        assert done.request_counts is not None and done.request_counts.completed == 30
        ok = c.chat.completions.with_raw_response.create(**body("online", max_tokens=10))
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"  # only the online one counted
    stats = sim.stats()
    assert stats["requests"] == stats["successes"] == 1 and stats["rate_limited"] == 0
    assert sum(row["requests"] for row in stats["series"]) == 1


# -- validation --------------------------------------------------------------------------------
GOOD = line("good", body(1))


@pytest.mark.parametrize(
    ("rows", "code", "param", "bad_line"),
    [
        pytest.param([GOOD, b"{not json"], "invalid_json_line", None, 2, id="not-json"),
        pytest.param([GOOD, b"[1, 2]"], "invalid_json_line", None, 2, id="not-an-object"),
        pytest.param(
            [{k: v for k, v in GOOD.items() if k != "custom_id"}],
            "missing_required_parameter",
            "custom_id",
            1,
            id="no-custom_id",
        ),
        pytest.param(
            [GOOD, {k: v for k, v in GOOD.items() if k != "method"} | {"custom_id": "b"}],
            "missing_required_parameter",
            "method",
            2,
            id="no-method",
        ),
        pytest.param(
            [{k: v for k, v in GOOD.items() if k != "url"}],
            "missing_required_parameter",
            "url",
            1,
            id="no-url",
        ),
        pytest.param(
            [{k: v for k, v in GOOD.items() if k != "body"}],
            "missing_required_parameter",
            "body",
            1,
            id="no-body",
        ),
        pytest.param(
            [line("e", body(1), url="/v1/embeddings")], "invalid_url", "url", 1, id="wrong-url"
        ),
        pytest.param([GOOD, GOOD], "duplicate_custom_id", "custom_id", 2, id="duplicate-id"),
        pytest.param([GOOD | {"method": "GET"}], "invalid_method", "method", 1, id="get"),
        pytest.param([b"", b"  "], "empty_file", None, None, id="empty"),
        pytest.param(
            [line(f"m{i}", body(i)) for i in range(4)],
            "too_many_requests",
            None,
            None,
            id="over-batch_max_lines",
        ),
        pytest.param(
            [line("big", body("x" * 1200))], "file_too_large", None, None, id="over-batch_max_bytes"
        ),
    ],
)
def test_a_bad_input_file_fails_validation_with_per_line_errors(
    make_simulator: Any,
    rows: list[Any],
    code: str,
    param: str | None,
    bad_line: int | None,
) -> None:
    sim = make_simulator(**FAST, batch_max_lines=3, batch_max_bytes=1000)
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    with client(sim) as c:
        batch = submit(c, data)
        assert batch.status == "validating" and batch.errors is None
        failed, _ = wait(c, batch.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.in_progress_at is None and failed.output_file_id is None
    assert failed.request_counts is not None and failed.request_counts.total == 0
    assert failed.errors is not None and failed.errors.object == "list"
    assert failed.errors.data is not None
    (error,) = failed.errors.data
    assert (error.code, error.param, error.line) == (code, param, bad_line)
    assert error.message
    stats = sim.stats()
    assert stats["batches_failed"] == 1 and stats["batch_lines_submitted"] == 0


def test_every_bad_line_is_listed(batch_sim: Simulator) -> None:
    rows = [
        json.dumps(GOOD).encode(),
        b"",  # blank lines are skipped, but still numbered
        b"nope",
        json.dumps(line("x", body(2), url="/v1/responses")).encode(),
        json.dumps(GOOD).encode(),
    ]
    with client(batch_sim) as c:
        failed, _ = wait(c, submit(c, b"\n".join(rows)).id)
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("invalid_json_line", 3),
        ("invalid_url", 4),
        ("duplicate_custom_id", 5),
    ]


def test_create_and_upload_refuse_what_openai_refuses(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        with pytest.raises(openai.BadRequestError, match=r"\.jsonl"):
            c.files.create(file=("requests.csv", b"a,b\n"), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            c.batches.create(input_file_id="file-nope", endpoint=ENDPOINT, completion_window="24h")
        uploaded = c.files.create(file=("r.jsonl", jsonl([GOOD])), purpose="batch")
        with pytest.raises(openai.BadRequestError) as info:
            c.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
            )
        assert info.value.body["param"] == "endpoint"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            c.batches.create(
                input_file_id=uploaded.id,
                endpoint=ENDPOINT,
                completion_window="1h",  # type: ignore[arg-type]
            )
        other = c.files.create(file=("notes.txt", b"hello"), purpose="user_data")
        with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
            c.batches.create(input_file_id=other.id, endpoint=ENDPOINT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
        assert c.files.delete(other.id).deleted
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(other.id)
        assert [f.id for f in c.files.list(purpose="batch")] == [uploaded.id]
    assert batch_sim.stats()["batches_created"] == 0


# -- expiry, cancel, failures ------------------------------------------------------------------
def test_an_expired_batch_keeps_the_lines_it_finished(make_simulator: Any) -> None:
    sim = make_simulator(**{**FAST, "batch_delay": 1.0, "batch_expire_after": 0.42})
    with client(sim) as c:
        batch = submit(c, jsonl([line(f"x{i}", body(i)) for i in range(10)]))
        assert batch.expires_at is not None and batch.expires_at - batch.created_at <= 1
        expired, polls = wait(c, batch.id)
        output = read(c, expired.output_file_id)
        errors = read(c, expired.error_file_id)
    assert expired.status == "expired" and expired.expired_at is not None
    assert "in_progress" in [p.status for p in polls]
    assert expired.completed_at is None and expired.finalizing_at is None
    assert expired.request_counts is not None
    assert (expired.request_counts.total, expired.request_counts.completed) == (10, 4)
    assert expired.request_counts.failed == 0  # expired lines ran neither way
    assert [o["custom_id"] for o in output] == [f"x{i}" for i in range(4)]
    assert [e["custom_id"] for e in errors] == [f"x{i}" for i in range(4, 10)]
    for e in errors:
        assert e["response"] is None and e["error"]["code"] == "batch_expired"
    stats = sim.stats()
    assert stats["batches_expired"] == 1
    assert (stats["batch_lines_ok"], stats["batch_lines_expired"]) == (4, 6)


def test_cancel_keeps_the_lines_done_before_it(make_simulator: Any) -> None:
    sim = make_simulator(**{**FAST, "batch_delay": 1.0, "batch_cancel_delay": 0.2})
    with client(sim) as c:
        batch = submit(c, jsonl([line(f"c{i}", body(i)) for i in range(10)]))
        wait(c, batch.id, until=("in_progress",))
        time.sleep(0.3)
        cancelling = c.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        assert cancelling.output_file_id is None
        assert c.batches.retrieve(batch.id).status == "cancelling"
        cancelled, _ = wait(c, batch.id)
        output = read(c, cancelled.output_file_id)
        errors = read(c, cancelled.error_file_id)
        with pytest.raises(openai.ConflictError, match="cancelled"):
            c.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.request_counts is not None
    done = cancelled.request_counts.completed
    assert 2 <= done <= 6
    assert [o["custom_id"] for o in output] == [f"c{i}" for i in range(done)]
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert len(errors) == 10 - done
    stats = sim.stats()
    assert stats["batches_cancelled"] == 1 and stats["batch_lines_cancelled"] == 10 - done


def test_cancelling_a_finished_batch_is_a_conflict(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        batch = submit(c, jsonl([GOOD]))
        wait(c, batch.id)
        with pytest.raises(openai.ConflictError, match="completed"):
            c.batches.cancel(batch.id)


def test_cancel_while_validating_runs_nothing(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        batch = submit(c, jsonl([line(f"v{i}", body(i)) for i in range(3)]))
        c.batches.cancel(batch.id)
        cancelled, _ = wait(c, batch.id)
        errors = read(c, cancelled.error_file_id)
    assert cancelled.in_progress_at is None and cancelled.output_file_id is None
    assert len(errors) == 3
    assert batch_sim.stats()["batch_lines_submitted"] == 0


def test_line_failures_go_to_the_error_file_with_their_response(make_simulator: Any) -> None:
    sim = make_simulator(**FAST, batch_line_failure_rate=0.3, models=("gpt-4o-mini",), seed=4)
    rows = [line(f"f{i}", body(i)) for i in range(20)]
    rows.append(line("no-messages", {"model": "gpt-4o-mini"}))
    rows.append(line("other-model", body("m") | {"model": "gpt-9"}))
    with client(sim) as c:
        done, _ = wait(c, submit(c, jsonl(rows)).id)
        output = read(c, done.output_file_id)
        errors = read(c, done.error_file_id)
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id["no-messages"]["response"]["status_code"] == 400
    assert by_id["no-messages"]["response"]["body"]["error"]["param"] == "messages"
    assert by_id["other-model"]["response"]["status_code"] == 404
    injected = [e for e in errors if e["response"]["status_code"] == 500]
    assert 2 <= len(injected) <= 12
    assert all(e["error"] is None for e in errors)
    assert injected[0]["response"]["body"]["error"]["type"] == "server_error"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (
        len(output),
        len(errors),
    )
    assert len(output) + len(errors) == 22
    stats = sim.stats()
    assert (stats["batch_lines_ok"], stats["batch_lines_failed"]) == (len(output), len(errors))
    assert sum(stats["faults"].values()) == 0, "batch failures are not online faults"


# -- list, files, duplicates, reset ------------------------------------------------------------
def test_list_pages_newest_first(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        ids = [submit(c, jsonl([line(f"l{k}", body(k))])).id for k in range(5)]
        page = c.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2]
        assert page.has_more
        raw = c.batches.with_raw_response.list(limit=2).http_response.json()
        assert (raw["object"], raw["first_id"], raw["last_id"]) == ("list", ids[4], ids[3])
        assert [b.id for b in c.batches.list(limit=2)] == ids[::-1]  # auto-pagination
        last = c.batches.list(limit=2, after=ids[1])
        assert [b.id for b in last.data] == [ids[0]] and not last.has_more
        assert [b.id for b in c.batches.list()] == ids[::-1]


def test_resubmitting_expired_lines_is_not_paying_twice(make_simulator: Any) -> None:
    sim = make_simulator(**{**FAST, "batch_delay": 0.8, "batch_expire_after": 0.45})
    with client(sim) as c:
        first, _ = wait(c, submit(c, jsonl([line(f"d{i}", body(i)) for i in range(4)])).id)
        assert first.status == "expired" and first.request_counts is not None
        assert first.request_counts.completed == 2
        # The client resubmits the two lines that expired (same ids, same bodies).
        second, _ = wait(c, submit(c, jsonl([line(f"d{i}", body(i)) for i in (2, 3)])).id)
        assert second.request_counts is not None and second.request_counts.completed == 1
    stats = sim.stats()
    assert stats["batch_lines_ok"] == 3 and stats["batch_lines_expired"] == 3
    assert stats["batch_duplicate_lines"] == 0


def test_lines_paid_for_in_an_earlier_batch_are_counted(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        wait(c, submit(c, jsonl([line(f"d{i}", body(i)) for i in range(3)])).id)
        assert batch_sim.stats()["batch_duplicate_lines"] == 0
        # The same body under a new custom_id, a new body under a paid custom_id, one new line.
        again = [line("new-id", body(0)), line("d1", body("new")), line("fresh", body("fresh"))]
        wait(c, submit(c, jsonl(again)).id)
    assert batch_sim.stats()["batch_duplicate_lines"] == 2


def test_batch_endpoints_require_the_api_key(make_simulator: Any) -> None:
    sim = make_simulator(**FAST, api_key=API_KEY)
    with client(sim) as c, pytest.raises(openai.AuthenticationError):
        c.files.create(file=("r.jsonl", jsonl([GOOD])), purpose="batch")
    with openai.OpenAI(base_url=sim.base_url, api_key=API_KEY, max_retries=0) as c:
        batch = submit(c, jsonl([GOOD]))
        with pytest.raises(openai.AuthenticationError), client(sim) as wrong:
            wrong.batches.retrieve(batch.id)


def test_reset_forgets_files_and_batches(batch_sim: Simulator) -> None:
    with client(batch_sim) as c:
        batch = submit(c, jsonl([GOOD]))
        batch_sim.reset()
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(batch.input_file_id)
        assert list(c.batches.list()) == []
    stats = batch_sim.stats()
    assert stats["batches_created"] == stats["batch_files_uploaded"] == 0


def test_stopping_mid_batch_leaves_nothing_behind(make_simulator: Any) -> None:
    """No task per batch: stopping with a batch in progress warns of nothing (warnings fail)."""
    sim = make_simulator(**{**FAST, "batch_delay": 30.0})
    with client(sim) as c:
        batch = submit(c, jsonl([line(f"s{i}", body(i)) for i in range(5)]))
        wait(c, batch.id, until=("in_progress",))
    sim.stop()
