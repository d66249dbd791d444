"""An OpenAI-compatible LLM simulator for dry runs, tests and benchmarks.

It speaks the Chat Completions wire format well enough for the openai SDK and
``ChatOpenAI`` (structured output in ``json_schema`` and tool-calling modes,
usage, streaming), and behaves like a provider under load: latency with
jitter, requests/tokens-per-minute limits answered with OpenAI's 429 body and
headers, and faults on demand. See ``docs/simulator.md``.
"""

from dask_llm.simulator._config import SimulatorConfig
from dask_llm.simulator._server import Simulator, fetch_stats, serve

__all__ = ["Simulator", "SimulatorConfig", "fetch_stats", "serve"]
