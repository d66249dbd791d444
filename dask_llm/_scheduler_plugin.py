"""The job ledger on a ``distributed`` scheduler (see ``_coordinator``).

A module of its own so that nothing else imports ``distributed`` for it: the
client registers ``LedgerPlugin`` when a job is built on a ``distributed``
client, and the scheduler unpickles it by reference (so it needs dask-llm
installed, as the workers do). Workers call its one handler,
``dask_llm_lease``, through their own connection to the scheduler.

It also sums, for the scheduler's ``/metrics`` (``_metrics``), the run-record
deltas the workers' progress events carry through the scheduler's event log.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from dask_llm._coordinator import HANDLER, PLUGIN_NAME, Coordinator
from dask_llm._progress import TOPIC


class LedgerPlugin(SchedulerPlugin):
    """Holds the ledgers of the jobs running on this cluster."""

    name = PLUGIN_NAME
    idempotent = True  # a second job on the same cluster keeps the first's plugin

    coordinator: Coordinator

    async def start(self, scheduler: Any) -> None:
        # Made here, on the scheduler: the plugin travels there pickled, and a
        # coordinator (a lock, its ledgers) is not something to send.
        self.coordinator = Coordinator()
        scheduler.handlers[HANDLER] = self.handle

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC and isinstance(msg, dict) and isinstance(msg.get("record"), dict):
            from dask_llm import _metrics

            _metrics.install()
            _metrics.add_cluster_delta(msg["record"])

    def handle(self, job: str, member: str, report: dict[str, Any], **_: Any) -> dict[str, Any]:
        return self.coordinator.lease(job, member, report)
