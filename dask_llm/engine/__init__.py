"""Running a job: partitions, rows, chain calls, retries, stops.

``runner`` (one partition on its own event loop), ``calls`` (one chain call
of one row, with its retries), ``job`` (what a job's partitions in one
process share: throttle, cache, breaker, stops), ``retry`` (which failures
are retried and how long to wait), ``loop`` (the event-loop bridge, safe
in notebooks) and ``handoff`` (a batch job's partitions each on a thread of
its own on Dask's local schedulers, so that their batch waits overlap).
"""
