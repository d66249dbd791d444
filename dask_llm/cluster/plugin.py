"""The job ledger on a ``distributed`` scheduler (see ``limits.coordinator``).

A module of its own so that nothing else imports ``distributed`` for it: the
client registers ``LedgerPlugin`` when a job is built on a ``distributed``
client, and the scheduler unpickles it by reference (so it needs dask-llm
installed, as the workers do). Workers call its one handler,
``dask_llm_lease``, through their own connection to the scheduler.

``register(client)`` installs the plugin, once per client.

It also sums, for the scheduler's ``/metrics`` (``observe.metrics``), the run-record
deltas the workers' progress events carry through the scheduler's event log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from dask_llm.core.runtime import part
from dask_llm.limits.coordinator import HANDLER, PLUGIN_NAME, Coordinator
from dask_llm.observe import metrics as _metrics
from dask_llm.observe.progress import TOPIC

log = logging.getLogger(__name__)


class Registered:
    """The ``distributed`` clients whose scheduler got the plugin from this process (a
    part of the process's ``core.runtime``), held weakly: a client that is gone goes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: weakref.WeakSet[Any] = weakref.WeakSet()


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
            _metrics.install()
            _metrics.add_cluster_delta(msg["record"])

    def handle(self, job: str, member: str, report: dict[str, Any], **_: Any) -> dict[str, Any]:
        return self.coordinator.lease(job, member, report)


def register(client: Any) -> None:
    """Install the ledger plugin on ``client``'s scheduler (once per client; best effort).

    A scheduler that cannot load dask-llm refuses it: the workers then fall back
    to an even share of the limit (and say so in the log).
    """
    registered = part(Registered)
    with registered.lock:
        if client in registered.clients:
            return
        registered.clients.add(client)
    try:
        if threading.current_thread() is getattr(client.loop, "_thread", None) or _in_loop(client):
            # Called while the client submits a graph from its own event loop: the
            # registration goes ahead of the graph on the same connection.
            client.loop.add_callback(
                client._register_scheduler_plugin,
                plugin=LedgerPlugin(),
                name=PLUGIN_NAME,
                idempotent=True,
            )
        else:
            client.register_plugin(LedgerPlugin(), name=PLUGIN_NAME)
    except (OSError, RuntimeError, ValueError, TypeError, ImportError) as exc:
        log.warning("dask-llm: no job ledger on the scheduler (%s: %s)", type(exc).__name__, exc)


def _in_loop(client: Any) -> bool:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(client.loop, "asyncio_loop", None)
