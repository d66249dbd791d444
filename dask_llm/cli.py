"""The ``dask-llm`` command line: ``enrich``, ``estimate``, ``simulate``, ``demo``.

Errors a shell user can fix (a missing file, a bad chain reference, an
unreachable scheduler, a bad option, input files whose columns differ) end
with one line on stderr, ``dask-llm: error: ...``, and a non-zero exit (2 for
usage errors, 1 otherwise), not a traceback; and they are found before any
request is paid for.

``enrich`` writes its Parquet output atomically: into a directory next to
``OUTPUT`` that is renamed to it at the end, so an interrupted or failed run
leaves no partial output and never a mix of two runs' parts; an ``OUTPUT``
that is not empty is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import importlib
import importlib.util
import math
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any, Final, cast

import click

import dask_llm
from dask_llm.chains.chain import _takes_no_arguments
from dask_llm.core.config import (
    DEFAULT_BATCH,
    DEFAULT_ERRORS,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_RETRY,
    SERVICE_TIERS,
    BatchPolicy,
    RetryPolicy,
    ServiceTier,
    Told,
)
from dask_llm.demo import main as run_demo
from dask_llm.simulator import SimulatorConfig, serve
from dask_llm.simulator._config import LIMIT_MODES

#: ``enrich``'s exit status when the job stopped and rows failed for it (docs/cli.md); the
#: output is written all the same. 1 is any other error, 2 a usage error, 130 Ctrl-C.
STOPPED_EXIT_CODES: Final = {"fatal": 3, "budget": 4}


@click.group()
@click.version_option(package_name="dask-llm")
def main() -> None:
    """Enrich DataFrames with LLM chains at scale."""


def run() -> None:
    """The ``dask-llm`` script: click's commands, with usage errors on one line."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("dask-llm: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"dask-llm: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _simulator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One option per ``SimulatorConfig`` field: its name, type, default and help, from the
    field itself (``--model`` repeats, for ``models``; a ``bool`` is a flag; a field with
    ``choices`` in its metadata, and ``limit_mode``, takes one of them)."""
    types = {"int": int, "float": float, "str": str}
    for spec in reversed(fields(SimulatorConfig)):
        help_text = spec.metadata.get("help")
        base, _, optional = str(spec.type).partition(" | ")
        if spec.name == "models":
            option = click.option("--model", "models", multiple=True, help=help_text)
        elif base == "bool":
            option = click.option(f"--{spec.name.replace('_', '-')}", is_flag=True, help=help_text)
        elif spec.name == "limit_mode" or "choices" in spec.metadata:
            option = click.option(
                f"--{spec.name.replace('_', '-')}",
                type=click.Choice(spec.metadata.get("choices", LIMIT_MODES)),
                default=spec.default,
                show_default=True,
                help=help_text,
            )
        else:
            option = click.option(
                f"--{spec.name.replace('_', '-')}",
                type=types[base],
                default=spec.default,
                show_default=not optional,
                help=help_text,
            )
        command = option(command)
    return command


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback).")
@click.option("--port", default=8000, show_default=True, help="Port; 0 picks a free one.")
@_simulator_options
def simulate(host: str, port: int, models: tuple[str, ...], **options: object) -> None:
    """Run the OpenAI-compatible simulator until Ctrl-C."""
    try:
        config = SimulatorConfig.from_kwargs(models=models or None, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        serve(config, host=host, port=port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


def load_chains(reference: str) -> Any:
    """``path/to/module.py:name`` or ``package.module:name`` -> the object (called if a factory)."""
    import cloudpickle

    module_ref, sep, name = reference.rpartition(":")
    if not sep or not module_ref or not name:
        raise click.BadParameter(
            f"{reference!r}: expected MODULE.py:NAME or package.module:NAME", param_hint="--chains"
        )
    try:
        if module_ref.endswith(".py") or os.sep in module_ref:
            if not os.path.exists(module_ref):
                raise click.BadParameter(f"no such file: {module_ref}", param_hint="--chains")
            mod_name = "dask_llm_user_chains_" + os.path.splitext(os.path.basename(module_ref))[0]
            spec = importlib.util.spec_from_file_location(mod_name, module_ref)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except click.BadParameter:
        raise
    except Exception as exc:
        raise click.BadParameter(
            f"cannot load {module_ref}: {type(exc).__name__}: {exc}", param_hint="--chains"
        ) from None
    # Workers cannot import the user's file: ship its classes and functions by value.
    cloudpickle.register_pickle_by_value(module)
    if not hasattr(module, name):
        raise click.BadParameter(f"{module_ref} has no {name!r}", param_hint="--chains")
    obj = getattr(module, name)
    if callable(obj) and not hasattr(obj, "invoke") and _takes_no_arguments(obj):
        try:
            obj = obj()  # a factory of the chains
        except Exception as exc:
            raise click.BadParameter(
                f"{name}() failed: {type(exc).__name__}: {exc}", param_hint="--chains"
            ) from None
    return obj


def read_inputs(inputs: tuple[str, ...], blocksize: int) -> Any:
    """CSV or Parquet files (globs allowed) as one lazy Dask DataFrame.

    CSV headers are read first: files whose columns differ are refused here,
    naming the file, rather than failing after the calls are paid.
    """
    import dask.dataframe as dd

    paths: list[str] = []
    for pattern in inputs:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found or not all(os.path.exists(p) for p in found):
            raise click.BadParameter(f"no such file: {pattern}", param_hint="INPUT")
        paths += found
    kinds = {os.path.splitext(p)[1].lower() for p in paths}
    if kinds <= {".parquet", ".pq"} or all(os.path.isdir(p) for p in paths):
        try:
            return dd.read_parquet(paths)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read {paths[0]}: {exc}", param_hint="INPUT") from None
    if kinds <= {".csv", ".tsv", ".gz"}:
        _same_columns(paths)
        return dd.read_csv(paths, blocksize=None if kinds == {".gz"} else blocksize)
    raise click.BadParameter(
        f"cannot read {', '.join(sorted(kinds))} files: give CSV or Parquet", param_hint="INPUT"
    )


def _same_columns(paths: list[str]) -> None:
    import pandas as pd

    first: list[str] | None = None
    for path in paths:
        try:
            columns = list(pd.read_csv(path, nrows=0).columns)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="INPUT") from None
        if first is None:
            first = columns
        elif columns != first:
            raise click.BadParameter(
                f"{path} has other columns than {paths[0]} "
                f"({', '.join(columns)} vs {', '.join(first)})",
                param_hint="INPUT",
            )


def _blocksize(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from dask.utils import parse_bytes

    try:
        size = int(parse_bytes(value))
    except (ValueError, TypeError):
        raise click.BadParameter(f"{value!r} is not a size such as 16MB") from None
    if size <= 0:
        raise click.BadParameter(f"{value!r}: give a size above zero")
    return size


def limit_of(text: str) -> float | dict[str, float]:
    """``--rpm``, ``--tpm``, ``--output-tpm``: a number for every provider apart (``600``),
    or numbers by provider name (``anthropic=50,openai=30000``). Raises ``ValueError`` for
    anything else, or a number not above 0."""
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not number > 0:
            raise ValueError(f"{text!r}: give a number above 0")
        return number
    limits: dict[str, float] = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        try:
            limit = float(value)
        except ValueError:
            limit = math.nan
        if not equals or not name.strip() or not limit > 0:
            raise ValueError(
                f"{text!r} is not a limit: give a number (600), or numbers above 0 by "
                "provider (anthropic=50,openai=30000)"
            )
        limits[name.strip()] = limit
    return limits


def _limit(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> float | dict[str, float] | None:
    if value is None:
        return None
    try:
        return limit_of(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


#: ``--deadline``'s durations: a number and its unit, one or more (``1h30m``).
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")
_UNIT_S: Final = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}


def deadline_of(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``--deadline``: seconds (``5400``) or a duration (``90m``, ``2h``, ``1h30m``, ``1d``)
    from ``now``, or an ISO datetime (local time unless it carries an offset), as an aware
    datetime. Raises ``ValueError`` for anything else."""
    now = dt.datetime.now(dt.UTC) if now is None else now
    value = text.strip().lower()
    try:
        return now + dt.timedelta(seconds=float(value))
    except (ValueError, OverflowError):  # not a number, or no time at all (nan, inf)
        pass
    parts = _DURATION.findall(value)
    if parts and "".join(number + unit for number, unit in parts) == value:
        try:
            return now + dt.timedelta(seconds=sum(float(n) * _UNIT_S[u] for n, u in parts))
        except OverflowError:
            raise ValueError(f"{text!r} is too far ahead") from None
    try:
        at = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a deadline: give seconds, a duration such as 90m, 2h or 1h30m, "
            "or an ISO datetime such as 2030-01-31T18:00"
        ) from None
    return at if at.tzinfo is not None else at.astimezone()  # naive: local time


def _deadline(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        at = deadline_of(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if at <= dt.datetime.now(dt.UTC):
        raise click.BadParameter(f"{value!r} is already past")
    return at


#: Seconds ``--scheduler`` gets to answer before the command gives up.
CONNECT_TIMEOUT_S = 10.0


def connect(scheduler: str | None) -> Any:
    if not scheduler:
        return None
    from distributed import Client

    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise click.ClickException(f"cannot reach the scheduler at {scheduler}: {exc}") from None


_common = [
    click.argument("inputs", nargs=-1, required=True, metavar="INPUT..."),
    click.option(
        "--chains",
        "chains_ref",
        required=True,
        help="MODULE.py:NAME (or package.module:NAME): a list of Chain, a {name: "
        "runnable} dict, or a zero-argument function returning one.",
    ),
    click.option(
        "--rpm",
        default=None,
        callback=_limit,
        help="Requests per minute for the job: for each provider apart (600), or by "
        "provider (anthropic=50,openai=30000; one not named: from its headers).",
    ),
    click.option(
        "--tpm",
        default=None,
        callback=_limit,
        help="Tokens per minute for the job (Anthropic: input tokens), as --rpm.",
    ),
    click.option(
        "--output-tpm",
        default=None,
        callback=_limit,
        help="Output tokens per minute (Anthropic's output limit; default: from its "
        "headers), as --rpm.",
    ),
    click.option(
        "--cache",
        "cache_path",
        default=None,
        help="Result cache file (default: $DASK_LLM_CACHE or ./.dask-llm-cache/).",
    ),
    click.option("--no-cache", is_flag=True, help="Do not read or write the result cache."),
    click.option(
        "--batch",
        is_flag=True,
        help="Use the Batch API (half price, answers within its 24 h window).",
    ),
    click.option(
        "--budget-usd",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Hard cap on the job's spend in US dollars.",
    ),
    click.option(
        "--deadline",
        default=None,
        callback=_deadline,
        help="Finish by then at the least cost, choosing among the Batch API, Flex and list "
        "price: seconds, a duration (90m, 2h, 1h30m) or an ISO datetime (local time unless "
        "it has an offset). Not with --batch or --service-tier.",
    ),
    click.option(
        "--blocksize",
        default="16MB",
        show_default=True,
        callback=_blocksize,
        help="CSV partition size.",
    ),
]


def _with_common(fn: Any) -> Any:
    for decorator in reversed(_common):
        fn = decorator(fn)
    return fn


@main.command()
@_with_common
@click.option("-o", "--output", required=True, help="Parquet directory to write.")
@click.option(
    "--overwrite", is_flag=True, help="Replace OUTPUT if it exists (swapped in at the end)."
)
@click.option("--scheduler", default=None, help="Address of a dask scheduler (tcp://host:8786).")
@click.option(
    "--errors",
    type=click.Choice(["column", "raise"]),
    default=DEFAULT_ERRORS,
    show_default=True,
    help="Record failures per row, or stop at the first.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_CONCURRENCY,
    help="Requests in flight per worker process, at most (default: what the rate needs, "
    "its share x latency; 256 while no rate is known).",
)
@click.option(
    "--attempts",
    type=click.IntRange(min=1),
    default=DEFAULT_RETRY.attempts,
    show_default=True,
    help="Most attempts per call (RetryPolicy.attempts).",
)
@click.option(
    "--retry-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETRY.timeout,
    show_default=True,
    help="Most seconds spent retrying one call (RetryPolicy.timeout).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds one request may take (default: the model's own, else 60).",
)
@click.option(
    "--batch-poll",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_BATCH.poll_max,
    show_default=True,
    help="Longest seconds between polls of a batch (--batch).",
)
@click.option(
    "--batch-fallback",
    type=click.Choice(["retry", "online"]),
    default=DEFAULT_BATCH.fallback,
    show_default=True,
    help="Lines that failed or expired: resubmit in the next batch, or send online.",
)
@click.option(
    "--service-tier",
    type=click.Choice(list(SERVICE_TIERS)),
    default=None,
    help="Send every OpenAI request by Flex processing (Batch API prices, answers in "
    "seconds to minutes) or at list price (default: each model's own).",
)
@click.option(
    "--compiled/--no-compiled",
    default=True,
    show_default=True,
    help="Call prompt | ChatOpenAI chains without LangChain's runtime per call, once proven "
    "equal on each partition's first calls (docs/compiled.md).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
@click.option(
    "--report",
    "report_path",
    default=None,
    help="Write the run's report (one offline HTML file of plots and tables) here.",
)
def enrich(
    inputs: tuple[str, ...],
    chains_ref: str,
    output: str,
    overwrite: bool,
    scheduler: str | None,
    rpm: Told,
    tpm: Told,
    output_tpm: Told,
    cache_path: str | None,
    no_cache: bool,
    errors: str,
    max_concurrency: int | None,
    attempts: int,
    retry_timeout: float,
    request_timeout: float | None,
    blocksize: int,
    batch: bool,
    budget_usd: float | None,
    deadline: dt.datetime | None,
    batch_poll: float,
    batch_fallback: str,
    service_tier: str | None,
    compiled: bool,
    progress: bool | None,
    report_path: str | None,
) -> None:
    """Enrich CSV/Parquet INPUT files with the chains; write Parquet to OUTPUT."""
    target = _output_dir(output, overwrite)
    _check_report_path(report_path)
    frame = read_inputs(inputs, blocksize)
    chains = load_chains(chains_ref)
    try:
        out = frame.llm.enrich(
            chains,
            rpm=rpm,
            tpm=tpm,
            output_tpm=output_tpm,
            errors="raise" if errors == "raise" else "column",
            max_concurrency=max_concurrency,
            retry=RetryPolicy(attempts=attempts, timeout=retry_timeout),
            request_timeout=request_timeout,
            cache=False if no_cache else (cache_path or True),
            progress=progress,
            budget_usd=budget_usd,
            batch=BatchPolicy(
                poll_initial=min(DEFAULT_BATCH.poll_initial, batch_poll),
                poll_max=batch_poll,
                fallback="online" if batch_fallback == "online" else "retry",
            )
            if batch
            else False,
            service_tier=cast(ServiceTier | None, service_tier),  # a click.Choice of them
            compiled=compiled,
            deadline=deadline,
        )
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    client = connect(scheduler)
    try:
        with _atomic(target, overwrite) as staging, warnings.catch_warnings():
            # dask's writer uses inplace=, which pandas 3.1 deprecates: noise for a user.
            warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame")
            out.to_parquet(staging, write_index=False)
    except dask_llm.ChainError as exc:
        raise click.ClickException(str(exc)) from None
    except dask_llm.JobStopped as exc:
        raise click.ClickException(f"stopped: {exc}") from None
    finally:
        if client is not None:
            client.close()
        ran = dask_llm.last_run()
        if report_path is not None and ran is not None:
            ran.report(report_path)  # also for a run that stopped: it shows why
    summary = dask_llm.last_run()
    if report_path is not None:
        click.echo(f"report: {report_path}")
    click.echo(f"wrote {output}: {summary}" if summary is not None else f"wrote {output}")
    stop = summary.record.stop if summary is not None and summary.record is not None else None
    if summary is not None and stop is not None and summary.failed_rows:
        code = STOPPED_EXIT_CODES.get(stop[0], 1)
        click.echo(
            f"dask-llm: stopped: {stop[1]}: {summary.failed_rows:,} of {summary.rows:,} rows "
            f"failed (their llm_error says why; rerun to resume); exit {code}",
            err=True,
        )
        sys.exit(code)


def _check_report_path(report_path: str | None) -> None:
    """The report's directory must exist and be writable: found before anything is paid for."""
    if report_path is None:
        return
    folder = os.path.dirname(os.path.abspath(report_path))
    if not os.path.isdir(folder):
        raise click.BadParameter(
            f"the directory {folder} does not exist; create it, or write the report elsewhere",
            param_hint="--report",
        )
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"the directory {folder} is not writable", param_hint="--report")


def _output_dir(output: str, overwrite: bool) -> str:
    """The output directory, checked before anything is read or paid for."""
    if "://" in output:
        # An object store has no rename: refuse a non-empty OUTPUT, else write in place.
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(output)
        if fs.exists(root) and fs.ls(root) and not overwrite:
            raise click.BadParameter(
                f"{output} exists and is not empty; pass --overwrite to replace it",
                param_hint="--output",
            )
        return output
    path = os.path.abspath(output)
    if os.path.isfile(path):
        raise click.BadParameter(f"{output} is a file, not a directory", param_hint="--output")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise click.BadParameter(
            f"{output} exists and is not empty; pass --overwrite to replace it",
            param_hint="--output",
        )
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"no such directory: {parent}", param_hint="--output")
    return path


@contextlib.contextmanager
def _atomic(path: str, overwrite: bool) -> Iterator[str]:
    """A staging directory next to ``path``, renamed to it when the body succeeds."""
    if "://" in path:
        if overwrite:
            from fsspec.core import url_to_fs

            fs, root = url_to_fs(path)
            if fs.exists(root):
                fs.rm(root, recursive=True)
        yield path
        return
    tag = uuid.uuid4().hex[:8]
    staging = f"{path}.dask-llm-partial-{tag}"
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(path):
        old = f"{path}.dask-llm-old-{tag}"
        os.rename(path, old)
        os.rename(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, path)


@main.command()
@_with_common
@click.option(
    "--service-tier",
    type=click.Choice(list(SERVICE_TIERS)),
    default=None,
    help="Price every OpenAI request at Flex (the list price shown beside) or at list "
    "price (default: each model's own).",
)
def estimate(
    inputs: tuple[str, ...],
    chains_ref: str,
    rpm: Told,
    tpm: Told,
    output_tpm: Told,
    cache_path: str | None,
    no_cache: bool,
    blocksize: int,
    batch: bool,
    budget_usd: float | None,
    deadline: dt.datetime | None,
    service_tier: str | None,
) -> None:
    """What enriching INPUT would cost and take, without sending a request."""
    frame = read_inputs(inputs, blocksize)
    chains = load_chains(chains_ref)
    try:
        est = frame.llm.estimate(
            chains,
            rpm=rpm,
            tpm=tpm,
            output_tpm=output_tpm,
            cache=False if no_cache else (cache_path or True),
            batch=batch,
            budget_usd=budget_usd,
            service_tier=cast(ServiceTier | None, service_tier),  # a click.Choice of them
            deadline=deadline,
        )
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(est))


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo(args: tuple[str, ...]) -> None:
    """The wine example: two dependent chains on the built-in simulator (see --help)."""
    run_demo(list(args), prog="dask-llm demo")


if __name__ == "__main__":  # pragma: no cover
    main()
