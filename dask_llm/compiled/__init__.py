"""The compiled path: common chains called without LangChain's runtime per call, proven equal.

For ``prompt | ChatOpenAI`` chains (bound, with structured output, with
LangChain's parsers) the request is built from the prompt and what LangChain
and the SDK built once, sent through the job's transport, and read straight
into the row's result; on each partition the first calls are proven equal to
LangChain's, bytes and values (see ``docs/compiled.md``).
"""

from dask_llm.compiled.caller import CompiledChain, Verdicts, compile_chain, enabled

__all__ = ["CompiledChain", "Verdicts", "compile_chain", "enabled"]
