"""Shipping chains to worker processes without their clients or secrets.

``ChatOpenAI`` cannot be pickled (its HTTP clients hold ``_thread.RLock``s),
nor can a ``ChatAnthropic`` that has built its clients, and even if they
could, the API key would travel inside the task graph. So a chain is
pickled as a *recipe*: the runnable graph with every OpenAI and Anthropic
model (a chat model with one of ``KEY_FIELDS``) replaced by its class and
the constructor fields the user set, minus clients and secrets. The worker
rebuilds the model, which reads its key from the worker's own environment
(``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``), as any process would.

Chains that are not plain data (a model created inside a closure, a custom
client) ship through a factory instead: ``Chain.from_factory(make_chain)``;
the factory itself is pickled with cloudpickle and called on the worker.

An explicit ``api_key=`` (a dummy key for a local vLLM, say) is not in the
recipe either. ``enrich(..., ship_api_keys=True)`` sends such keys with the
job's options, only when every worker runs on this machine (checked in the
client, before the graph leaves it); a recipe names its key by a hash, and
the worker puts the key back when it rebuilds the model.

We do not use LangChain's ``dumpd``/``load`` for this: it refuses pydantic
classes (every structured-output chain) and lambdas, which cloudpickle
handles; we only take the model objects out of its way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import cloudpickle
from langchain_core.language_models import BaseChatModel

from dask_llm.chains.graph import CLIENT_FIELDS, find, rewrite
from dask_llm.chains.outputs import is_configurable_model
from dask_llm.core.errors import WorkerSetupError
from dask_llm.core.runtime import part

#: The field that holds the API key of each kind of chat model shipped as a recipe, and the
#: environment variable its SDK reads the key from in each process: OpenAI's
#: (``BaseChatOpenAI``) and Anthropic's (``ChatAnthropic``). The chains layer sits below
#: ``providers``; a new provider whose model holds a key adds its line here.
KEY_ENV = {"openai_api_key": "OPENAI_API_KEY", "anthropic_api_key": "ANTHROPIC_API_KEY"}
KEY_FIELDS = tuple(KEY_ENV)


def key_field(obj: Any) -> str | None:
    """The API key's field of a chat model shipped as a recipe; None for any other object."""
    if not isinstance(obj, BaseChatModel):
        return None
    fields = type(obj).model_fields
    return next((name for name in KEY_FIELDS if name in fields), None)


class ModelRecipe:
    """How to rebuild a model on a worker: its class and the fields the user set.

    ``key_ref`` names an explicit ``api_key=`` (a hash of it, never the key): the
    worker uses the key only if the job was told to ship keys (``provide_keys``).
    """

    __slots__ = ("cls", "fields", "had_key", "key_ref")
    _dask_llm_recipe = True

    def __init__(
        self, cls: type, fields: dict[str, Any], had_key: bool, key_ref: str | None = None
    ) -> None:
        self.cls = cls
        self.fields = fields
        self.had_key = had_key
        self.key_ref = key_ref

    def build(self) -> Any:
        fields = dict(self.fields)
        shipped = part(ShippedKeys)
        if self.key_ref is not None and self.key_ref in shipped:
            fields["api_key"] = shipped[self.key_ref]
        try:
            return self.cls(**fields)
        # The model's own validation (a missing key, a bad field): reported as what it is.
        except Exception as exc:
            hint = (
                " The API key is never shipped to workers: set OPENAI_API_KEY (or"
                " ANTHROPIC_API_KEY) in the workers' environment, or pass"
                " enrich(..., ship_api_keys=True) when the workers run on this machine."
                if self.had_key
                else ""
            )
            raise WorkerSetupError(
                f"could not rebuild {self.cls.__name__} on this worker: "
                f"{type(exc).__name__}: {exc}.{hint}"
            ) from None


def _recipe(model: Any, field: str) -> ModelRecipe:
    if (
        getattr(model, "http_async_client", None) is not None
        or getattr(model, "http_client", None) is not None
    ):
        raise TypeError(
            f"{type(model).__name__} has its own http client, which cannot be sent to "
            "other processes; build the chain in each process: Chain.from_factory(make_chain)"
        )
    fields = {
        name: getattr(model, name) for name in model.model_fields_set if name not in CLIENT_FIELDS
    }
    key = getattr(model, field, None)
    explicit = is_explicit(model, field)
    return ModelRecipe(
        type(model), fields, had_key=key is not None, key_ref=key_ref(key) if explicit else None
    )


class ShippedKeys(dict[str, str]):
    """Keys jobs shipped to this process (ship_api_keys=True), by key_ref: a part of the
    process's ``core.runtime``, one entry per distinct key."""


def is_explicit(model: Any, field: str) -> bool:
    """Whether the user gave ``model`` its key (not read from this process's environment).

    ChatAnthropic stores a key it read from ``ANTHROPIC_API_KEY`` as if it had been
    given: a key equal to that variable here counts as read from it (each worker reads
    its own). ChatOpenAI does not (its key is a default, outside ``model_fields_set``).
    """
    key = getattr(model, field, None)
    if key is None or field not in model.model_fields_set:
        return False
    if field == "anthropic_api_key":
        secret = key.get_secret_value() if hasattr(key, "get_secret_value") else str(key)
        return bool(secret) and secret != os.environ.get(KEY_ENV[field])
    return True


def key_ref(key: Any) -> str:
    """A name for a key that does not reveal it (the first 16 hex of its sha256)."""
    secret = key.get_secret_value() if hasattr(key, "get_secret_value") else str(key)
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def explicit_keys(runnable: Any) -> dict[str, tuple[str, str]]:
    """The explicit ``api_key=`` of every OpenAI and Anthropic model in ``runnable``, by
    key_ref: (the key, the environment variable workers would read otherwise)."""
    keys: dict[str, tuple[str, str]] = {}
    for model in find(runnable, lambda x: key_field(x) is not None):
        field = key_field(model)
        assert field is not None
        key = getattr(model, field, None)
        if key is not None and is_explicit(model, field):
            secret = key.get_secret_value() if hasattr(key, "get_secret_value") else str(key)
            keys[key_ref(key)] = (secret, KEY_ENV[field])
    return keys


def provide_keys(keys: Iterable[tuple[str, str]]) -> None:
    """Make shipped keys available to recipes rebuilt in this process."""
    part(ShippedKeys).update(keys)


_SECRET_CONFIG = frozenset({"api_key", *KEY_FIELDS})


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
    """Pickle ``runnable`` with its OpenAI and Anthropic models turned into recipes."""

    def visit(obj: Any) -> Any:
        field = key_field(obj)
        if field is not None:
            return _recipe(obj, field)
        if is_configurable_model(obj):
            return ConfigurableRecipe(obj)
        return NotImplemented

    portable = rewrite(runnable, visit)
    try:
        return cloudpickle.dumps(portable)
    # Pickling fails in many ways (TypeError, PicklingError, AttributeError, ...).
    except Exception as exc:
        raise TypeError(
            f"this chain cannot be sent to other processes ({type(exc).__name__}: {exc}); "
            "build it in each process instead: Chain.from_factory(make_chain)"
        ) from None


def loads(data: bytes) -> Any:
    """Unpickle a runnable and rebuild its models from their recipes."""
    portable = cloudpickle.loads(data)

    def visit(obj: Any) -> Any:
        if isinstance(obj, ModelRecipe | ConfigurableRecipe):
            return obj.build()
        return NotImplemented

    return rewrite(portable, visit)
