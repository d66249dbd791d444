"""The ground every other part stands on: configuration, errors, usage and cost, place.

``config`` holds every option and policy of a job and every default, as
frozen data (no I/O, no imports upward); ``errors`` the exception tree;
``usage`` token usage, the price table and the one cost function; ``where``
which process this is (client, pool child, ``distributed`` worker).
Imports nothing of dask-llm.
"""
