"""``JobHandle``: what travels with a job's partitions so that they can reach back.

A job's options (``EnrichOptions``) are plain data: pickling them does
nothing but copy values. The way back from the processes that run a job to
the client that started it is this separate, small object. Pickling it in
the client (which Dask does just before it submits the graph) is the moment
to open that way, because only then is it known where the partitions go:

* ``distributed``: the client subscribes to the workers' progress events
  and registers the job ledger's scheduler plugin (the client may have been
  created after ``enrich()`` was called);
* dask's process pool: the client's job hub (``cluster.hub``) is started and its
  address and the current run travel with the handle, so that a child can
  poll for stops and send its counts back.

Unpickled in a worker or a pool child, a handle does nothing more: the
partition's ``Job`` (``engine.job``) opens its connection from the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from dask_llm.cluster import hub as _hub
from dask_llm.cluster.plugin import register
from dask_llm.core import where as _cluster
from dask_llm.observe.progress import listen_on_client


@dataclass(frozen=True, kw_only=True)
class JobHandle:
    """The client's side of one job, as its partitions see it."""

    #: The job's id (``EnrichOptions.job``).
    job: str
    #: Explicit API keys to give recipes on workers (ship_api_keys=True): (key_ref, key).
    keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    #: The client's job hub (address, authkey), filled in when pickled for a pool child.
    hub: tuple[tuple[str, int], bytes] | None = field(default=None, repr=False)
    #: The client's run (one local computation) this copy was pickled for (``cluster.hub``).
    run: int | None = None
    #: The run's drop box for a batch job's frames (``cluster.hub.drop_box``), named by the
    #: client: a pool child's own temporary directory may differ.
    box: str | None = None

    def __repr__(self) -> str:  # never the keys
        return f"JobHandle(job={self.job!r}, run={self.run!r})"

    def __dask_tokenize__(self) -> Any:
        return ("dask_llm.JobHandle", self.job)

    def __reduce__(self) -> Any:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if not _cluster.in_pool_child() and _cluster.distributed_worker() is None:
            client = _cluster.distributed_client()
            if client is not None:
                listen_on_client(client)
                register(client)
                if self.keys and _cluster.remote_worker(client) is not None:
                    # Checked at enrich() too; the cluster may have grown since.
                    raise ValueError(
                        "ship_api_keys=True: a worker of this cluster runs on another host "
                        f"({_cluster.remote_worker(client)}); keys are only sent to workers "
                        "on this machine"
                    )
            else:
                if values["hub"] is None:
                    values["hub"] = _hub.hub_address()
                values["run"] = _hub.current_run()
                values["box"] = str(_hub.drop_box(self.job, values["run"]))
                _hub.run_holds(values["run"], self.job)
        return (_rebuild, (values,))


def _rebuild(values: dict[str, Any]) -> JobHandle:
    return JobHandle(**values)
