"""Shipping chains to worker processes without their clients or secrets.

``ChatOpenAI`` cannot be pickled (its HTTP clients hold ``_thread.RLock``s),
and even if it could, its API key would travel inside the task graph. So a
chain is pickled as a *recipe*: the runnable graph with every OpenAI model
replaced by its class and the constructor fields the user set, minus clients
and secrets. The worker rebuilds the model, which reads its key from the
worker's own environment (``OPENAI_API_KEY``), as any process would.

Chains that are not plain data (a model created inside a closure, a custom
client) ship through a zero-argument factory instead: ``Chain(make_chain)``;
the factory itself is pickled with cloudpickle and called on the worker.

We do not use LangChain's ``dumpd``/``load`` for this: it refuses pydantic
classes (every structured-output chain) and lambdas, which cloudpickle
handles; we only take the model objects out of its way.
"""

from __future__ import annotations

from typing import Any

import cloudpickle
from langchain_openai.chat_models.base import BaseChatOpenAI

from dask_llm._errors import WorkerSetupError
from dask_llm._graph import CLIENT_FIELDS, rewrite
from dask_llm._outputs import is_configurable_model


class ModelRecipe:
    """How to rebuild a model on a worker: its class and the fields the user set."""

    __slots__ = ("cls", "fields", "had_key")
    _dask_llm_recipe = True

    def __init__(self, cls: type, fields: dict[str, Any], had_key: bool) -> None:
        self.cls = cls
        self.fields = fields
        self.had_key = had_key

    def build(self) -> Any:
        try:
            return self.cls(**self.fields)
        except Exception as exc:
            hint = (
                " The API key is never shipped to workers: set OPENAI_API_KEY in the"
                " workers' environment."
                if self.had_key
                else ""
            )
            raise WorkerSetupError(
                f"could not rebuild {self.cls.__name__} on this worker: "
                f"{type(exc).__name__}: {exc}.{hint}"
            ) from None


def _recipe(model: Any) -> ModelRecipe:
    if model.http_async_client is not None or model.http_client is not None:
        raise TypeError(
            f"{type(model).__name__} has its own http client, which cannot be sent to "
            "other processes; pass a zero-argument factory that builds the chain: Chain(make_chain)"
        )
    fields = {
        name: getattr(model, name) for name in model.model_fields_set if name not in CLIENT_FIELDS
    }
    key = getattr(model, "openai_api_key", None)
    return ModelRecipe(type(model), fields, had_key=key is not None)


_SECRET_CONFIG = frozenset({"api_key", "openai_api_key"})


class ConfigurableRecipe:
    """How to rebuild a configurable ``init_chat_model`` on a worker, without its key."""

    __slots__ = ("cls", "fields", "queued")
    _dask_llm_recipe = True

    def __init__(self, model: Any) -> None:
        self.cls = type(model)
        config = dict(model._default_config)
        self.fields = {
            "default_config": {k: v for k, v in config.items() if k not in _SECRET_CONFIG},
            "configurable_fields": model._configurable_fields,
            "config_prefix": model._config_prefix,
        }
        self.queued = list(model._queued_declarative_operations)

    def build(self) -> Any:
        return self.cls(**self.fields, queued_declarative_operations=self.queued)


def dumps(runnable: Any) -> bytes:
    """Pickle ``runnable`` with its OpenAI models turned into recipes."""

    def visit(obj: Any) -> Any:
        if isinstance(obj, BaseChatOpenAI):
            return _recipe(obj)
        if is_configurable_model(obj):
            return ConfigurableRecipe(obj)
        return NotImplemented

    portable = rewrite(runnable, visit)
    try:
        return cloudpickle.dumps(portable)
    except Exception as exc:
        raise TypeError(
            f"this chain cannot be sent to other processes ({type(exc).__name__}: {exc}); "
            "pass a zero-argument factory that builds it on the worker: Chain(make_chain)"
        ) from None


def loads(data: bytes) -> Any:
    """Unpickle a runnable and rebuild its models from their recipes."""
    portable = cloudpickle.loads(data)

    def visit(obj: Any) -> Any:
        if isinstance(obj, ModelRecipe | ConfigurableRecipe):
            return obj.build()
        return NotImplemented

    return rewrite(portable, visit)
