"""``enrich``'s options: one meaning per name, one default each, typed, old names deprecated."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import dask_llm
from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY, EnrichOptions
from dask_llm.engine import job as _job
from dask_llm.engine.calls import PartitionStats
from dask_llm.transport.pipeline import LoopClients
from tests.chains import llm, summary_chain
from tests.helpers import requests

ROWS = pd.DataFrame({"description": ["plum", "cedar"]})


def chains(url: str, **kwargs: Any) -> list[dask_llm.Chain]:
    return [dask_llm.Chain(summary_chain(url, **kwargs), name="s")]


@pytest.mark.parametrize(
    ("retry", "attempts"),
    [
        pytest.param(dask_llm.RetryPolicy(attempts=2, wait_initial=0.0), 2, id="policy"),
        pytest.param(3, 3, id="int"),
    ],
)
def test_retry_takes_a_policy_or_a_number_of_attempts(
    make_simulator: Any, retry: Any, attempts: int
) -> None:
    sim = make_simulator(error_rate=1.0)
    out = ROWS.head(1).llm.enrich(chains(sim.base_url), retry=retry, cache=False)
    assert out["llm_error"].str.contains("500").all()
    assert requests(sim) == attempts


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param({"timeout": 5.0}, "request_timeout=", id="timeout"),
        pytest.param({"attempts": 2}, "retry=", id="attempts"),
        pytest.param({"retry_timeout": 30.0}, "retry=", id="retry_timeout"),
    ],
)
def test_old_option_names_warn_and_still_work(sim: Any, old: dict[str, Any], new: str) -> None:
    with pytest.warns(FutureWarning, match=new):
        out = ROWS.llm.enrich(chains(sim.base_url), cache=False, **old)
    assert out["llm_error"].isna().all()


def test_bad_retry_values_are_refused_before_any_request(sim: Any) -> None:
    with pytest.raises(TypeError, match="retry="):
        ROWS.llm.enrich(chains(sim.base_url), retry="often")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="attempts"):
        ROWS.llm.enrich(chains(sim.base_url), retry=0)
    assert requests(sim) == 0


def local_timeout(model: Any, request_timeout: float | None) -> Any:
    job = _job.attach(EnrichOptions(job=f"timeouts-{request_timeout}"))

    async def main() -> Any:
        clients = LoopClients(job, PartitionStats())
        local, _ = clients.localize(model, timeout=request_timeout)
        timeout = local.root_async_client.timeout
        await clients.aclose()
        return timeout

    try:
        return asyncio.run(main())
    finally:
        _job.detach(job)


def test_a_models_own_timeout_is_kept_unless_request_timeout_is_given(sim: Any) -> None:
    assert local_timeout(llm(sim.base_url, timeout=3), None) == 3
    assert local_timeout(llm(sim.base_url), None) == DEFAULT_REQUEST_TIMEOUT
    assert local_timeout(llm(sim.base_url, timeout=3), 7.0) == 7.0


def test_defaults_are_written_once() -> None:
    """The signature's defaults are the constants of _options and _retry (one place)."""
    import inspect

    from dask_llm.core import config as _options

    params = inspect.signature(dask_llm.enrich).parameters
    assert params["max_concurrency"].default == _options.DEFAULT_MAX_CONCURRENCY
    assert params["retry"].default is DEFAULT_RETRY
    assert params["sync_threads"].default == _options.DEFAULT_SYNC_THREADS
    assert params["errors"].default == _options.DEFAULT_ERRORS
    assert params["error_column"].default == _options.DEFAULT_ERROR_COLUMN


def test_prices_are_read_only() -> None:
    with pytest.raises(TypeError):
        dask_llm.PRICES["gpt-4o-mini"] = (0.0, 0.0)  # type: ignore[index]


#: mypy's settings for ``TYPED``: dask_llm followed, the libraries it names skipped.
MYPY_INI = """
[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-pandas.*,numpy.*,dask.*,distributed.*,langchain.*,langchain_core.*,langchain_openai.*,langchain_anthropic.*,openai.*,anthropic.*,pydantic.*,pyarrow.*,aiohttp.*,httpx.*,tqdm.*,tiktoken.*]
follow_imports = skip
"""

TYPED = """
import pandas as pd
import dask_llm

pdf = pd.DataFrame({"a": ["x"]})
dask_llm.enrich(pdf, [], rpm=60.0, retry=3, request_timeout=5.0)
dask_llm.enrich(pdf, [], rpm="fast")
dask_llm.enrich(pdf, [], rpmm=60.0)
pdf.llm.enrich([], retry=dask_llm.RetryPolicy(attempts=2))
"""


@pytest.mark.slow  # mypy: ~4 s of CPU
def test_public_signatures_are_typed(tmp_path: Path) -> None:
    """Every option has a type a checker (and an IDE) sees: misspelt or mistyped ones are flagged.

    (Return types follow the frame: pandas in, pandas out; Dask in, Dask out. A checker
    sees them where pandas and dask are typed; without pandas-stubs both are Any.)
    """
    api = pytest.importorskip("mypy.api")
    source = tmp_path / "typed.py"
    source.write_text(textwrap.dedent(TYPED))
    # What is checked is dask_llm's own signatures: the third-party packages they name
    # are taken as Any (not analysed), which makes a cold check ~4 s instead of ~40 s.
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_INI)
    cache = str(tmp_path / "mypy_cache")
    stdout, _, _ = api.run([str(source), "--config-file", str(config), "--cache-dir", cache])
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert sorted({e.split(":")[1] for e in errors}) == ["7", "8"], stdout


@pytest.mark.parametrize(
    ("prices", "named"),
    [
        pytest.param({"gpt-4o-mini": (1,)}, "2 or 4", id="one-number"),
        pytest.param({"gpt-4o-mini": (1, 2, 3)}, "2 or 4", id="three-numbers"),
        pytest.param({"gpt-4o-mini": (-0.15, 0.6)}, ">= 0", id="negative"),
        pytest.param({"gpt-4o-mini": (float("nan"), 0.6)}, ">= 0", id="nan"),
        pytest.param({"gpt-4o-mini": ("0.15", 0.6)}, "numbers", id="text"),
        pytest.param({"gpt-4o-mini": 0.15}, "numbers", id="not-a-tuple"),
    ],
)
def test_bad_prices_are_refused_before_any_request(sim: Any, prices: Any, named: str) -> None:
    # Issue 28: (1,) failed every row with IndexError after its paid call.
    with pytest.raises(ValueError, match=rf"prices=.*'gpt-4o-mini'.*{named}"):
        ROWS.llm.enrich(chains(sim.base_url), prices=prices, cache=False)
    with pytest.raises(ValueError, match=r"prices="):
        ROWS.llm.estimate(chains(sim.base_url), prices=prices, cache=False)
    assert requests(sim) == 0


def test_a_batch_window_the_api_does_not_take_is_refused() -> None:
    with pytest.raises(ValueError, match="completion_window"):
        dask_llm.BatchPolicy(completion_window="1h")


def test_an_answer_paid_for_is_cached_before_its_accounting_can_fail(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault after the paid answer (as the IndexError of a bad price was): the
    # rows fail, but a rerun pays nothing again.
    from dask_llm.core import usage as _usage

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("accounting broke")

    cache = tmp_path / "cache.sqlite"
    with monkeypatch.context() as patch:
        patch.setattr(_usage.Attempt, "paid", broken)
        failed = ROWS.llm.enrich(chains(sim.base_url), cache=cache)
    assert failed["llm_error"].str.contains("accounting broke").all()
    paid = requests(sim)
    assert paid == len(ROWS)
    again = ROWS.llm.enrich(chains(sim.base_url), cache=cache)
    assert again["llm_error"].isna().all()
    assert requests(sim) == paid
