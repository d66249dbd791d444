"""dask-llm: enrich Dask and pandas DataFrames with LangChain chains at scale.

``import dask_llm`` registers the ``llm`` accessor on Dask and pandas DataFrames::

    out = ddf.llm.enrich([dask_llm.Chain(summary_chain), dask_llm.Chain(features_chain)])
"""

import logging

from dask_llm.api import DaskLLMAccessor, PandasLLMAccessor, enrich, estimate, pilot
from dask_llm.chains.chain import Chain
from dask_llm.core.config import BatchPolicy, QualityGate, RetryPolicy
from dask_llm.core.deadline import Deadline
from dask_llm.core.errors import (
    BudgetExceeded,
    ChainError,
    DaskLLMError,
    JobStopped,
    PromptCacheWarning,
    WorkerSetupError,
)
from dask_llm.core.usage import BATCH_DISCOUNT, PRICES, PRICES_AS_OF, Price
from dask_llm.engine import job as _job  # noqa: F401  (registers the Ctrl-C callback)
from dask_llm.observe.progress import RunSummary, last_run
from dask_llm.observe.record import RunRecord
from dask_llm.preview.estimate import Estimate
from dask_llm.preview.pilot import Pilot
from dask_llm.transport.batch import cancel_batches

__all__ = [
    "BATCH_DISCOUNT",
    "PRICES",
    "PRICES_AS_OF",
    "BatchPolicy",
    "BudgetExceeded",
    "Chain",
    "ChainError",
    "DaskLLMAccessor",
    "DaskLLMError",
    "Deadline",
    "Estimate",
    "JobStopped",
    "PandasLLMAccessor",
    "Pilot",
    "Price",
    "PromptCacheWarning",
    "QualityGate",
    "RetryPolicy",
    "RunRecord",
    "RunSummary",
    "WorkerSetupError",
    "cancel_batches",
    "enrich",
    "estimate",
    "last_run",
    "pilot",
]

__version__ = "0.1.0.dev0"

# Silent unless the application configures logging: logging.getLogger("dask_llm")
# tells a person debugging a long job about retries, 429 slowdowns, learned
# limits, cache repairs and stops.
logging.getLogger("dask_llm").addHandler(logging.NullHandler())
