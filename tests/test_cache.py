"""The result cache: keys, durability, validation, concurrency; resume and dedup through enrich."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_llm
from dask_llm._cache import MemoryCache, SQLiteCache, make_key, open_cache
from tests.chains import features_chain, summary_chain
from tests.conftest import API_KEY


# -- keys ------------------------------------------------------------------------------------
def test_keys_ignore_input_order_and_numpy_types() -> None:
    a = make_key("fp", {"x": 1, "y": "ü🍷"})
    assert a == make_key("fp", {"y": "ü🍷", "x": np.int64(1)})
    assert a != make_key("fp2", {"x": 1, "y": "ü🍷"})
    assert a != make_key("fp", {"x": 2, "y": "ü🍷"})
    assert make_key("fp", {"t": pd.Timestamp("2024-01-01")}) == make_key(
        "fp", {"t": "2024-01-01T00:00:00"}
    )


def test_keys_refuse_objects_naming_the_variable() -> None:
    with pytest.raises(TypeError, match="'blob'"):
        make_key("fp", {"blob": object()})


# -- the SQLite store --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("plain text", id="text"),
        pytest.param("ünïcødé 🍷🍇", id="unicode-emoji"),
        pytest.param({"summary": "x", "features": ["a", "b"], "n": 3, "ok": True}, id="nested"),
        pytest.param(None, id="null"),
    ],
)
def test_round_trip(tmp_path: Path, value: Any) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("k", value)
    assert cache.get_many(["k", "missing"]) == {"k": value}
    cache.close()


def test_file_is_private(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "sub" / "c.sqlite")
    cache.put("k", "v")
    for suffix in ("", "-wal"):
        path = tmp_path / "sub" / f"c.sqlite{suffix}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, suffix
    cache.close()


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param("UPDATE results SET value = '\"evil\"' WHERE key = 'a'", id="edited-value"),
        pytest.param("UPDATE results SET value = '{broken' WHERE key = 'a'", id="invalid-json"),
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
    cache.put("a", "answer a again")
    assert cache.get_many(["a"]) == {"a": "answer a again"}
    cache.close()


def test_many_threads_write_at_once(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")

    def write(t: int) -> None:
        for i in range(150):
            cache.put(f"{t}-{i}", i)
        cache.close()

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 600
    cache.close()


def _write_many(cache: SQLiteCache, prefix: str, n: int) -> None:
    for i in range(n):
        cache.put(f"{prefix}-{i}", {"i": i})
    cache.close()


def test_processes_write_at_once_through_a_pickled_cache(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "c.sqlite")
    cache.put("parent", 1)
    clone = pickle.loads(pickle.dumps(cache))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(clone, f"p{k}", 200)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(cache) == 601
    cache.close()


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        pytest.param(True, SQLiteCache, id="true-default-path"),
        pytest.param(None, SQLiteCache, id="none-default-path"),
        pytest.param(False, type(None), id="false-off"),
        pytest.param("x.sqlite", SQLiteCache, id="path"),
        pytest.param(MemoryCache(), MemoryCache, id="object"),
    ],
)
def test_open_cache(tmp_path: Path, spec: Any, kind: type) -> None:
    assert isinstance(open_cache(spec, default_path=str(tmp_path / "d.sqlite")), kind)


def test_open_cache_refuses_other_things(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cache="):
        open_cache(42, default_path=str(tmp_path))  # type: ignore[arg-type]


# -- through enrich -----------------------------------------------------------------------------
def frame(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "description": [f"Review {i}: plum and cedar" for i in range(n)],
            "title": [f"Wine {i}" for i in range(n)],
            "country": ["Spain"] * n,
        }
    )


def chains(url: str) -> list[dask_llm.Chain]:
    return [
        dask_llm.Chain(summary_chain(url), name="summarize"),
        dask_llm.Chain(features_chain(url), name="features"),
    ]


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


def test_the_cache_file_holds_no_secret(sim: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    frame(4).llm.enrich(chains(sim.base_url), cache=path)
    for f in tmp_path.iterdir():
        assert API_KEY.encode() not in f.read_bytes(), f.name
