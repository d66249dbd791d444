"""Every HTTP request of a job: the request pipeline, online and Batch API senders.

``pipeline`` (the per-loop clients and the stages each request goes
through: cache, dedup, budget, throttle, send, record), ``wire`` (an answer
and what it means: the one place that reads a response), ``batch`` (the
Batch API sender, a sibling of the online one), ``dedup`` (identical
requests in flight share one answer) and ``sdk`` (the openai SDK fast path).
"""
