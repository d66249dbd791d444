"""Helpers the tests share: counting requests, frames, clusters, a two-provider job's ledgers,
running a script in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dask
import distributed
import pandas as pd

from dask_llm.core.runtime import part
from dask_llm.engine.job import Jobs
from dask_llm.limits.coordinator import local_coordinator

ROOT = Path(__file__).resolve().parent.parent


def reviews(n: int = 12, *, notes: str = "cassis, cedar and graphite") -> pd.DataFrame:
    """``n`` small wine reviews with the columns the wine chains read."""
    return pd.DataFrame(
        {
            "description": [f"Review {i}: {notes}" for i in range(n)],
            "title": [f"Wine {i}" for i in range(n)],
            "country": ["Chile"] * n,
        }
    )


#: Where a test cluster's scheduler serves HTTP (``/metrics``, and the dashboard where bokeh
#: is installed): a free port on the loopback. ``dashboard_address=None`` only turns the
#: dashboard off; the scheduler's HTTP server still binds 8787, and warns (an error here)
#: when another process holds it.
HTTP_ADDRESS = "127.0.0.1:0"


def local_cluster(*, spawn: bool = False, **options: Any) -> distributed.LocalCluster:
    """A ``LocalCluster`` on 127.0.0.1 whose HTTP server never takes port 8787.

    Its worker processes fork from the suite's fork server (see conftest), with this
    process's environment as it is now; ``spawn=True``: spawned, as a user's are, for a
    test whose workers must *lack* a variable this process had when the server started.
    """
    options = {"dashboard_address": HTTP_ADDRESS, **options}
    if spawn:
        with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
            return distributed.LocalCluster(**options)
    if options.get("processes", True):
        options.setdefault("env", dict(os.environ))
    return distributed.LocalCluster(**options)


def requests(sim: Any) -> int:
    """Requests the simulator has received since its last reset."""
    return int(sim.stats()["requests"])


def provider_ledger_rates() -> tuple[float | None, float | None]:
    """The requests/s that the last job in this process calling both OpenAI and Anthropic
    had lent by each provider's ledger of its own: (OpenAI's, Anthropic's)."""
    (job,) = [
        j for j in part(Jobs).by_key.values() if {"openai", "anthropic"} <= set(j.throttle.names())
    ][-1:]
    ledgers = local_coordinator()._jobs
    return ledgers[job.id].limits()[0], ledgers[f"{job.id}/anthropic"].limits()[0]


def run_script(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python process (for signals and exits a test cannot take)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
