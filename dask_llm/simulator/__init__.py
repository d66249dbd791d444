"""An OpenAI-compatible LLM simulator for dry runs, tests and benchmarks.

It speaks the Chat Completions wire format well enough for the openai SDK and
``ChatOpenAI`` (structured output in ``json_schema``, tool-calling and
``json_mode`` with format instructions, usage, streaming), answers OpenAI's
Batch and Files APIs with the same answers, and behaves like a provider under
load: latency with jitter, requests/tokens-per-minute limits (sliding, fixed
or token-bucket) answered with OpenAI's 429 body and headers, and faults on
demand (5xx, hangs, 403, spurious and billing 429s). ``/sim/stats`` counts it
all, per second too. See ``docs/simulator.md``.
"""

from dask_llm.simulator._config import SimulatorConfig
from dask_llm.simulator._server import Simulator, fetch_stats, serve

__all__ = ["Simulator", "SimulatorConfig", "fetch_stats", "serve"]
