"""``python -m dask_llm``: the same as the ``dask-llm`` command."""

from dask_llm.cli import run

run()
