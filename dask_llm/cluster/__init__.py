"""The way between a job's client and the processes that run it.

``handle`` (``JobHandle``: what travels with each partition; pickling it in
the client opens the way back), ``hub`` (the client's job hub for dask's
process pool: stops, progress, leases) and ``plugin`` (the job ledger's
scheduler plugin on ``distributed``, and its registration).
"""
