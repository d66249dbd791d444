"""What a job did, as numbers a person can read: records, progress, reports, metrics.

``record`` (the run record each process keeps), ``progress`` (the client's
view of a run: the bar, ``last_run()``), ``report`` (the HTML run report)
and ``metrics`` (Prometheus series on ``distributed``'s ``/metrics``).
"""
