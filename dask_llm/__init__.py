"""dask-llm: enrich Dask and pandas DataFrames with LangChain chains at scale.

``import dask_llm`` registers the ``llm`` accessor on Dask and pandas DataFrames::

    out = ddf.llm.enrich([dask_llm.Chain(summary_chain), dask_llm.Chain(features_chain)])
"""

from dask_llm._accessor import DaskLLMAccessor, PandasLLMAccessor, enrich
from dask_llm._chain import Chain
from dask_llm._errors import ChainError, DaskLLMError, WorkerSetupError
from dask_llm._retry import RetryPolicy

__all__ = [
    "Chain",
    "ChainError",
    "DaskLLMAccessor",
    "DaskLLMError",
    "PandasLLMAccessor",
    "RetryPolicy",
    "WorkerSetupError",
    "enrich",
]

__version__ = "0.1.0.dev0"
