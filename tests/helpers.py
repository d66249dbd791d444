"""Helpers the tests share: counting requests, frames, clusters, running a script in its own
process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import distributed
import pandas as pd

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


def local_cluster(**options: Any) -> distributed.LocalCluster:
    """A ``LocalCluster`` on 127.0.0.1 whose HTTP server never takes port 8787."""
    return distributed.LocalCluster(**{"dashboard_address": HTTP_ADDRESS, **options})


def requests(sim: Any) -> int:
    """Requests the simulator has received since its last reset."""
    return int(sim.stats()["requests"])


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
