"""Per-loop clients: aiohttp transport, the throttle in it, the user's model untouched."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import cloudpickle
import pytest

import dask_llm
from dask_llm.core.config import EnrichOptions
from dask_llm.engine import job as _job
from dask_llm.engine.calls import PartitionStats
from dask_llm.transport.pipeline import JobTransport, LoopClients
from tests.chains import llm, summary_chain
from tests.conftest import API_KEY


def test_models_get_an_aiohttp_client_with_the_throttle_and_no_sdk_retries(sim: Any) -> None:
    model = llm(sim.base_url)
    original = model.root_async_client

    job = _job.attach(EnrichOptions(job="test-transport", max_concurrency=4))

    async def main() -> None:
        clients = LoopClients(job, PartitionStats())
        local, tapped = clients.localize(model)
        assert tapped
        http = local.root_async_client._client
        assert "AioHttp" in type(http).__name__
        # The one private attribute we touch: fail loudly if the SDK moves it.
        assert isinstance(http._transport, JobTransport)
        assert local.root_async_client.max_retries == 0
        assert local.async_client is not model.async_client
        await local.ainvoke("hello")
        await clients.aclose()

    try:
        asyncio.run(main())
    finally:
        _job.detach(job)
    assert model.root_async_client is original  # the user's model is never mutated


def test_a_model_with_its_own_http_client_keeps_it(sim: Any) -> None:
    import httpx2 as httpx

    own = httpx.AsyncClient()
    model = llm(sim.base_url, http_async_client=own)
    local, tapped = LoopClients().localize(model)
    assert local is model
    assert not tapped  # its usage comes from LangChain's callbacks instead


def test_chains_pickle_without_key_and_rebuild_on_the_other_side(sim: Any) -> None:
    chain = dask_llm.Chain(summary_chain(sim.base_url), name="s")
    blob = cloudpickle.dumps(chain)
    assert API_KEY.encode() not in blob
    clone = pickle.loads(blob)
    assert clone.fingerprint == chain.fingerprint
    result = asyncio.run(clone.runnable.ainvoke({"description": "x"}))
    assert result.summary


def test_a_worker_without_a_key_gets_a_clear_error(
    sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = cloudpickle.dumps(dask_llm.Chain(summary_chain(sim.base_url), name="s"))
    monkeypatch.delenv("OPENAI_API_KEY")
    clone = pickle.loads(blob)
    with pytest.raises(dask_llm.WorkerSetupError, match="OPENAI_API_KEY"):
        clone.runnable  # noqa: B018
