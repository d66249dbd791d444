"""How fast a job may send: pacing, the job ledger, the budget, rate-limit headers.

``pacer`` (one throttle per job per process: pacing and concurrency),
``ledger`` (a process's lease of the job's rate and budget),
``coordinator`` (the job's ledger that lends those leases, in the client or
on the scheduler) and ``headers`` (Retry-After, and what a 429 means).
"""
