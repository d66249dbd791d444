"""The result cache: keys, durability, validation, concurrency; resume and dedup through enrich."""

from __future__ import annotations

import datetime
import hashlib
import math
import multiprocessing
import os
import pickle
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import dask_llm
from dask_llm.cache import MemoryCache, ResultCache, SQLiteCache, make_key, open_cache
from tests.chains import fake_chat_chain, summary_chain
from tests.chains import wine_chains as chains
from tests.conftest import API_KEY
from tests.helpers import reviews as frame

ROOT = Path(__file__).resolve().parents[1]


# -- keys ------------------------------------------------------------------------------------
def test_keys_are_sha256_of_fingerprint_and_canonical_json() -> None:
    """Pinned: a change here silently turns every user's cache into misses (paid again)."""
    inputs = {"n": 3, "description": "Plum, cedar 🍷", "tags": ["a", {"b": None}]}
    canonical = '{"description":"Plum, cedar 🍷","n":3,"tags":["a",{"b":null}]}'
    key = make_key("ab12", inputs)
    assert key == hashlib.sha256(f"ab12\0{canonical}".encode()).hexdigest()
    assert key == "bc34641cf6ff1fdb0a35be283507fb9af73f1fc91bc5ffdd36335b0f03293dd5"
    assert key == make_key("ab12", dict(inputs))


def test_keys_ignore_input_order_and_numpy_types() -> None:
    a = make_key("fp", {"x": 1, "y": "ü🍷", "d": {"p": 1, "q": [1, 2]}})
    assert a == make_key("fp", {"d": {"q": [1, 2], "p": 1}, "y": "ü🍷", "x": np.int64(1)})
    assert a != make_key("fp2", {"x": 1, "y": "ü🍷", "d": {"p": 1, "q": [1, 2]}})
    assert a != make_key("fp", {"x": 2, "y": "ü🍷", "d": {"p": 1, "q": [1, 2]}})
    assert make_key("fp", {"t": pd.Timestamp("2024-01-01")}) == make_key(
        "fp", {"t": "2024-01-01T00:00:00"}
    )


@pytest.mark.parametrize(
    ("numpy_value", "python_value"),
    [
        pytest.param(np.int64(7), 7, id="int64"),
        pytest.param(np.int8(-3), -3, id="int8"),
        pytest.param(np.float64(1.5), 1.5, id="float64"),
        pytest.param(np.float32(0.5), 0.5, id="float32"),
        pytest.param(np.bool_(True), True, id="bool"),
        pytest.param(np.str_("Rioja"), "Rioja", id="str"),
        pytest.param([np.int64(1), np.float64(2.5)], [1, 2.5], id="in-a-list"),
        pytest.param((1, "a"), [1, "a"], id="tuple-as-list"),
        pytest.param(datetime.date(2024, 5, 1), "2024-05-01", id="date"),
    ],
)
def test_keys_see_numpy_scalars_and_dates_as_plain_values(
    numpy_value: Any, python_value: Any
) -> None:
    assert make_key("fp", {"v": numpy_value}) == make_key("fp", {"v": python_value})


def test_nan_and_missing_markers_are_deterministic_and_distinct() -> None:
    def key(v: Any) -> str:
        return make_key("fp", {"v": v})

    assert key(float("nan")) == key(math.nan) == key(np.float64("nan")) == key(np.nan)
    assert key([float("nan")]) == key([np.nan])
    distinct = [
        key(float("nan")),
        key("nan"),
        key("NaN"),
        key(None),
        key(pd.NA),
        key(pd.NaT),
        key("NaT"),
        key(float("inf")),
        key("inf"),
        key(float("-inf")),
    ]
    assert len(set(distinct)) == len(distinct)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.array(["a", "b"], dtype=object), id="numpy-object"),
        pytest.param(np.array(["a", "b"]), id="numpy-str"),
        pytest.param(pd.array(["a", "b"], dtype="string"), id="pandas-extension"),
        pytest.param(pd.Series(["a", "b"]), id="series"),
        pytest.param(pa.array(["a", "b"]), id="arrow-array"),
        pytest.param(pa.scalar(["a", "b"]), id="arrow-list-scalar"),
    ],
)
def test_array_likes_are_keyed_like_lists(array: Any) -> None:
    """Lists read back from Parquet arrive as numpy arrays: they must hit the same entries."""
    assert make_key("fp", {"tags": array}) == make_key("fp", {"tags": ["a", "b"]})
    nested = make_key("fp", {"d": {"tags": array}})
    assert nested == make_key("fp", {"d": {"tags": ["a", "b"]}})


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        pytest.param({"blob": object()}, "'blob'", id="object"),
        pytest.param({"raw": b"bytes"}, "'raw'", id="bytes"),
        pytest.param({"tags": {1, 2}}, "'tags'", id="set"),
        pytest.param({"rows": [1, {"x": object()}]}, r"'rows'\[1\]\['x'\]", id="nested"),
        pytest.param({"m": {1: "a"}}, "'m'", id="non-str-key"),
    ],
)
def test_keys_refuse_other_values_naming_the_variable(inputs: dict[str, Any], named: str) -> None:
    with pytest.raises(TypeError, match=named):
        make_key("fp", inputs)


# -- the SQLite store --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("plain text", id="text"),
        pytest.param('ünïcødé 🍷🍇 中文 \u0000 "quoted"', id="unicode-emoji"),
        pytest.param({"summary": "x", "features": ["a", "b"], "n": 3, "ok": True}, id="nested"),
        pytest.param([[1, [2, [3]]], {"z": {"y": {"x": "🍷"}}}, [], {}], id="deep"),
        pytest.param({"b": 1, "a": 2}, id="key-order-kept"),
        pytest.param(-0.5e-300, id="float"),
        pytest.param(None, id="null"),
    ],
)
def test_round_trip(tmp_path: Path, value: Any) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("k", value)
    got = cache.get_many(["k", "missing"])
    assert got == {"k": value}
    assert json_order(got["k"]) == json_order(value)
    cache.close()
    again = SQLiteCache(tmp_path / "c.sqlite")  # read back through a new connection
    assert again.get_many(["k"]) == {"k": value}
    again.close()


def json_order(value: Any) -> Any:
    """Dict keys in order, so that an assertion can see a reordered answer."""
    if isinstance(value, dict):
        return [(k, json_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [json_order(v) for v in value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param({"x": object()}, id="object"),
    ],
)
@pytest.mark.parametrize(
    "kind", [pytest.param(SQLiteCache, id="sqlite"), pytest.param(None, id="memory")]
)
def test_values_that_are_not_json_are_refused(tmp_path: Path, value: Any, kind: Any) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite") if kind else MemoryCache()
    with pytest.raises((TypeError, ValueError)):
        cache.put("k", value)
    assert cache.get_many(["k"]) == {}
    cache.close()


def test_get_many_reads_beyond_one_query_and_counts(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    for i in range(1200):
        cache.put(f"k{i}", i)
    keys = [f"k{i}" for i in range(0, 1300, 1)]  # 1,200 hits, 100 misses, 3 chunks
    got = cache.get_many(keys)
    assert got == {f"k{i}": i for i in range(1200)}
    assert cache.get_many([]) == {}
    assert len(cache) == 1200
    assert cache.stats() == {"hits": 1200, "misses": 100, "puts": 1200, "invalid": 0}
    cache.close()


def modes(path: Path) -> dict[str, int]:
    return {
        suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) for suffix in ("", "-wal", "-shm")
    }


def test_file_and_its_wal_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, which would give 0644
    try:
        path = tmp_path / "new" / "dir" / "c.sqlite"
        cache = SQLiteCache(path)
        cache.put("k", "v")
        assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        cache.close()
    finally:
        os.umask(old)


def test_an_existing_readable_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    first = SQLiteCache(path)
    first.put("k", "v")
    first.close()
    os.chmod(path, 0o644)
    cache = SQLiteCache(path)
    assert cache.get_many(["k"]) == {"k": "v"}
    assert modes(path)[""] == 0o600
    cache.close()


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param("UPDATE results SET value = '\"evil\"' WHERE key = 'a'", id="edited-value"),
        pytest.param("UPDATE results SET checksum = 'abc' WHERE key = 'a'", id="bad-checksum"),
        pytest.param("UPDATE results SET value = '{broken' WHERE key = 'a'", id="invalid-json"),
        pytest.param("UPDATE results SET value = x'22616222' WHERE key = 'a'", id="blob-value"),
        pytest.param(
            "UPDATE results SET value = (SELECT value FROM results WHERE key = 'b'), "
            "checksum = (SELECT checksum FROM results WHERE key = 'b') WHERE key = 'a'",
            id="foreign-entry",
        ),
    ],
)
def test_tampered_entries_are_ignored_and_replaced(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "c.sqlite"
    cache = SQLiteCache(path)
    cache.put("a", "answer a")
    cache.put("b", "answer b")
    with sqlite3.connect(path) as raw:
        raw.execute(tamper)
    raw.close()
    assert cache.get_many(["a", "b"]) == {"b": "answer b"}
    assert cache.stats()["invalid"] == 1
    assert len(cache) == 1, "the invalid entry is deleted"
    cache.put("a", "answer a again")  # what the engine does on a miss: call, then put
    assert cache.get_many(["a", "b"]) == {"a": "answer a again", "b": "answer b"}
    cache.close()


def test_invalid_json_under_a_valid_checksum_is_ignored(tmp_path: Path) -> None:
    """A writer with the format's checksum but a broken value (say, a bug) is still a miss."""
    from dask_llm.cache import _checksum

    path = tmp_path / "c.sqlite"
    cache = SQLiteCache(path)
    cache.put("b", 1)
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO results VALUES ('a', '{nope', ?, 0)", (_checksum("a", "{nope"),))
    raw.close()
    assert cache.get_many(["a", "b"]) == {"b": 1}
    assert cache.stats()["invalid"] == 1
    cache.close()


# -- concurrency, processes, kills --------------------------------------------------------------
def _put_range(cache: ResultCache, prefix: str, n: int) -> None:
    for i in range(n):
        cache.put(f"{prefix}-{i}", {"i": i, "who": prefix, "text": "🍷" * (i % 7)})


def expected(prefixes: Sequence[str], n: int) -> dict[str, Any]:
    return {
        f"{p}-{i}": {"i": i, "who": p, "text": "🍷" * (i % 7)} for p in prefixes for i in range(n)
    }


def run_threads(target: Callable[[int], None], count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            target(t)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_four_threads_write_at_once(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("warm", 0)  # the main thread has a connection too

    def write(t: int) -> None:
        _put_range(cache, f"t{t}", 200)
        cache.close()  # this thread's connection

    assert run_threads(write, 4) == []
    assert cache.get_many(list(expected([f"t{t}" for t in range(4)], 200))) == expected(
        [f"t{t}" for t in range(4)], 200
    )
    assert len(cache) == 801
    cache.close()


def _child_writes(cache: SQLiteCache, prefix: str, n: int, start: Any) -> None:
    """In a spawned process: use the unpickled cache (parent's entry visible), then write."""
    assert cache.get_many(["parent"]) == {"parent": "from the parent"}
    start.wait(60)
    _put_range(cache, prefix, n)
    cache.close()


@pytest.mark.slow
def test_processes_and_threads_write_at_once_through_a_pickled_cache(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite", timeout=30.0)
    cache.put("parent", "from the parent")  # an open connection: pickling must not carry it
    clone = pickle.loads(pickle.dumps(cache))
    assert (clone.path, clone.timeout) == (cache.path, 30.0)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3 + 4)  # 3 processes and 4 threads start writing together
    procs = [ctx.Process(target=_child_writes, args=(cache, f"p{k}", 200, start)) for k in range(3)]
    for p in procs:
        p.start()

    def write(t: int) -> None:
        start.wait(60)
        _put_range(cache, f"t{t}", 200)
        cache.close()

    errors = run_threads(write, 4)
    for p in procs:
        p.join(60)
    assert errors == []
    assert [p.exitcode for p in procs] == [0, 0, 0]
    everyone = expected([f"p{k}" for k in range(3)] + [f"t{t}" for t in range(4)], 200)
    assert cache.get_many(list(everyone)) == everyone
    assert len(cache) == 600 + 800 + 1
    cache.close()


def _child_after_fork(cache: SQLiteCache) -> None:
    inherited = cache._local.conn  # white-box: the parent's, copied by fork
    assert cache.get_many(["parent"]) == {"parent": 1}
    assert cache._local.conn is not inherited, "a forked child must open its own connection"
    cache.put("child", 2)
    cache.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("parent", 1)
    child = multiprocessing.get_context("fork").Process(target=_child_after_fork, args=(cache,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert cache.get_many(["parent", "child"]) == {"parent": 1, "child": 2}
    cache.put("parent again", 3)  # the parent's connection still works
    assert len(cache) == 3
    cache.close()


WRITER = """
import sys
from dask_llm.cache import SQLiteCache
cache = SQLiteCache(sys.argv[1])
for i in range(1_000_000):
    cache.put(f"k{i}", {"i": i, "answer": "Plum and cedar. " * 4})
    print(i, flush=True)  # after put returned
"""


@pytest.mark.slow
def test_every_put_that_returned_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        acked = []
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) == 300:
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream, between or inside puts
                break
        acked += [int(line) for line in proc.stdout]  # acks already in the pipe
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    cache = SQLiteCache(path)
    got = cache.get_many([f"k{i}" for i in acked])
    assert len(got) == len(acked) >= 300
    assert all(got[f"k{i}"]["i"] == i for i in acked)
    assert cache.stats()["invalid"] == 0
    (check,) = sqlite3_once(path, "PRAGMA integrity_check")
    assert check == "ok"
    cache.close()


def sqlite3_once(path: Path, query: str) -> tuple[Any, ...]:
    raw = sqlite3.connect(path)
    try:
        row: tuple[Any, ...] = raw.execute(query).fetchone()
        return row
    finally:
        raw.close()


def test_close_ends_connections_of_finished_threads_and_reopens(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    assert run_threads(lambda t: cache.put(f"t{t}", t), 3) == []  # threads that never close
    cache.close()  # closes theirs (they ended) and this thread's, which has none
    assert cache.get_many(["t0", "t1", "t2"]) == {"t0": 0, "t1": 1, "t2": 2}  # reopened
    cache.close()


# -- memory cache and protocol --------------------------------------------------------------------
def test_memory_cache_round_trips_and_pickles_empty() -> None:
    cache = MemoryCache()
    value = {"summary": "🍷", "features": ["a"]}
    cache.put("k", value)
    got = cache.get_many(["k", "missing"])
    assert got == {"k": value}
    got["k"]["features"].append("mutated")
    assert cache.get_many(["k"]) == {"k": value}, "callers get copies"
    assert len(pickle.loads(pickle.dumps(cache))) == 0
    assert len(cache) == 1


def test_both_caches_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(MemoryCache(), ResultCache)
    assert isinstance(SQLiteCache(tmp_path / "c.sqlite"), ResultCache)


class DictCache:
    """A user's own cache: anything with get_many/put/close."""

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return {}

    def put(self, key: str, value: Any) -> None:
        pass

    def close(self) -> None:
        pass


MEMORY = MemoryCache()
OWN = DictCache()


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        pytest.param(True, "default", id="true-default-path"),
        pytest.param(None, "default", id="none-default-path"),
        pytest.param(False, None, id="false-off"),
        pytest.param("{tmp}/x.sqlite", "{tmp}/x.sqlite", id="str-path"),
        pytest.param(Path("{tmp}/y.sqlite"), "{tmp}/y.sqlite", id="pathlike"),
        pytest.param(MEMORY, MEMORY, id="memory-cache-itself"),
        pytest.param(OWN, OWN, id="own-object-itself"),
    ],
)
def test_open_cache(tmp_path: Path, spec: Any, expect: Any) -> None:
    default = tmp_path / "d.sqlite"
    if isinstance(spec, str | Path):
        spec = type(spec)(str(spec).format(tmp=tmp_path))
    got = open_cache(spec, default_path=default)
    if expect is None or not isinstance(expect, str):
        assert got is expect
    else:
        wanted = default if expect == "default" else Path(expect.format(tmp=tmp_path))
        assert isinstance(got, SQLiteCache)
        assert got.path == str(wanted)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        pytest.param(42, TypeError, "cache= takes True.*not int", id="int"),
        pytest.param(b"x.sqlite", TypeError, "not bytes", id="bytes"),
        pytest.param({"path": "x"}, TypeError, "not dict", id="dict"),
        pytest.param(object(), TypeError, "get_many/put/close", id="object-without-methods"),
        pytest.param("", ValueError, "empty path", id="empty-path"),
    ],
)
def test_open_cache_refuses_other_things(
    tmp_path: Path, spec: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        open_cache(spec, default_path=tmp_path / "d.sqlite")


# -- through enrich -----------------------------------------------------------------------------


def test_a_rerun_pays_nothing_and_gives_the_same_frame(sim: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    ddf = dd.from_pandas(frame(), npartitions=3)
    first = ddf.llm.enrich(chains(sim.base_url), cache=path).compute()
    assert sim.stats()["requests"] == 24
    second = ddf.llm.enrich(chains(sim.base_url), cache=path).compute()
    assert sim.stats()["requests"] == 24, "the rerun must not call the model"
    cols = ["summary", "sentiment", "features", "score", "llm_error"]
    pd.testing.assert_frame_equal(first[cols], second[cols])
    assert second["llm_input_tokens"].sum() == 0  # nothing paid this time


@pytest.mark.slow
def test_answers_paid_on_worker_processes_are_reused_everywhere(sim: Any, tmp_path: Path) -> None:
    """Workers key the cache exactly as the client does (fingerprints travel with the chain)."""
    path = tmp_path / "job.sqlite"
    ddf = dd.from_pandas(frame(8), npartitions=2)
    ddf.llm.enrich(chains(sim.base_url), cache=path).compute(scheduler="processes")
    assert sim.stats()["requests"] == 16
    ddf.llm.enrich(chains(sim.base_url), cache=path).compute(scheduler="threads")
    frame(8).llm.enrich(chains(sim.base_url), cache=path)
    assert sim.stats()["requests"] == 16
    # and two different chains never share keys on a worker
    other = [dask_llm.Chain(summary_chain(sim.base_url, temperature=0.3), name="summarize")]
    ddf.llm.enrich(other, cache=path).compute(scheduler="processes")
    assert sim.stats()["requests"] == 24


def test_more_rows_later_pay_only_for_the_new_ones(sim: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    frame(6).llm.enrich(chains(sim.base_url), cache=path)
    frame(10).llm.enrich(chains(sim.base_url), cache=path)
    assert sim.stats()["requests"] == 2 * 10
    assert sim.stats()["duplicate_requests"] == 0


def test_a_prompt_change_is_a_new_key(sim: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    frame(4).llm.enrich([dask_llm.Chain(summary_chain(sim.base_url))], cache=path)
    changed = summary_chain(sim.base_url, temperature=0.7)
    frame(4).llm.enrich([dask_llm.Chain(changed)], cache=path)
    assert sim.stats()["requests"] == 8


def test_identical_inputs_in_one_job_are_called_once(sim: Any) -> None:
    df = pd.DataFrame({"description": ["same text"] * 10 + ["other"] * 5})
    out = (
        dd.from_pandas(df, npartitions=3)
        .llm.enrich([dask_llm.Chain(summary_chain(sim.base_url))])  # the default cache
        .compute(scheduler="threads")
    )
    assert out["llm_error"].isna().all()
    assert sim.stats()["requests"] == 2
    assert out["summary"].nunique() == 2
    assert out["llm_input_tokens"].gt(0).sum() == 2  # paid once each, recorded once each


def test_without_a_cache_concurrent_repeats_still_share_one_call(make_simulator: Any) -> None:
    sim = make_simulator(latency=1.0)  # long enough for all 20 rows to overlap
    df = pd.DataFrame({"description": ["same text"] * 20})
    out = df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url))], cache=False)
    assert out["summary"].nunique() == 1
    assert sim.stats()["requests"] == 1


def test_without_a_cache_a_partitions_repeats_are_called_once_as_estimated(
    sim: Any,
) -> None:
    # Issue 28: 100 rows of 50 distinct texts made 100 requests; estimate() said 50.
    df = pd.DataFrame({"description": [f"text {i % 50}" for i in range(100)]})
    chains = [dask_llm.Chain(summary_chain(sim.base_url))]
    estimated = df.llm.estimate(chains, cache=False).calls
    out = df.llm.enrich(chains, cache=False, max_concurrency=1)  # repeats never overlap
    assert out["llm_error"].isna().all()
    assert sim.stats()["requests"] == estimated == 50
    # Without a cache, partitions (maybe processes) do not share answers: the estimate
    # counts each partition's distinct calls.
    two = dd.from_pandas(df.sort_values("description"), npartitions=2, sort=False)
    assert two.llm.estimate(chains, cache=False).calls <= 52
    spread = dd.from_pandas(df, npartitions=2, sort=False)  # each text in both partitions
    assert spread.llm.estimate(chains, cache=False).calls == 100


def test_the_cache_file_holds_no_secret(sim: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    frame(4).llm.enrich(chains(sim.base_url), cache=path)
    for f in tmp_path.iterdir():
        assert API_KEY.encode() not in f.read_bytes(), f.name


def _exclusive_lock_taken(path: str, queue: Any) -> None:
    """In a spawned process: can the database's SHARED-lock bytes be locked exclusively?

    They can only if no connection of another process holds its SHARED lock, which
    is what a closing connection checks before it checkpoints and removes the WAL.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002)
        queue.put(True)
    except OSError:
        queue.put(False)
    finally:
        os.close(fd)


@pytest.mark.slow  # a subprocess, or seconds of waiting
def test_a_thread_opening_its_connection_keeps_the_other_threads_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a database drops this process's POSIX locks on it.

    A new connection once opened and closed the file to create it 0600: the other
    threads' SHARED locks went with it, another process closing its last connection
    then took the database for its own and removed the WAL, and a thread's later
    puts were lost (seen once in CI, in the test above).
    """
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("a", 1)  # this thread's connection: WAL mode, a SHARED lock on the file
    other = threading.Thread(target=lambda: cache.get_many(["a"]))  # opens its own
    other.start()
    other.join()
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_exclusive_lock_taken, args=(cache.path, queue)
    )
    child.start()
    taken = queue.get(timeout=60)
    child.join(60)
    cache.close()
    assert taken is False


def test_a_chat_model_dask_llm_does_not_see_is_said_not_to_be_cached(sim: Any) -> None:
    chains = [
        dask_llm.Chain(summary_chain(sim.base_url), name="summarize"),
        dask_llm.Chain(fake_chat_chain(), name="fake"),
    ]
    with pytest.warns(UserWarning, match=r"chain 'fake'.*FakeListChatModel.*not cached") as seen:
        frame(10).llm.enrich(chains)
    assert len(seen) == 1
    frame(10).llm.enrich(chains, cache=False)  # nothing to say: no cache was asked for
