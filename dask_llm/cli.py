"""The ``dask-llm`` command line: ``simulate`` (and more to come)."""

from __future__ import annotations

import click

from dask_llm.simulator import SimulatorConfig, serve


@click.group()
@click.version_option(package_name="dask-llm")
def main() -> None:
    """Enrich DataFrames with LLM chains at scale."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback).")
@click.option("--port", default=8000, show_default=True, help="Port; 0 picks a free one.")
@click.option("--latency", default=0.0, show_default=True, help="Median seconds to first token.")
@click.option("--jitter", default=0.0, show_default=True, help="Lognormal sigma of the latency.")
@click.option(
    "--per-token-latency", default=0.0, show_default=True, help="Seconds per output token."
)
@click.option("--rpm", type=int, default=None, help="Requests per minute (429 beyond).")
@click.option("--tpm", type=int, default=None, help="Tokens per minute (429 beyond).")
@click.option(
    "--limit-window",
    default=1.0,
    show_default=True,
    help="Seconds over which rpm/tpm are enforced (OpenAI-style slices).",
)
@click.option("--max-in-flight", type=int, default=None, help="Concurrent requests (429 beyond).")
@click.option("--error-rate", default=0.0, show_default=True, help="Probability of HTTP 500.")
@click.option("--error-503", default=0.0, show_default=True, help="Probability of HTTP 503.")
@click.option("--hang", default=0.0, show_default=True, help="Probability of never answering.")
@click.option(
    "--malformed-json", default=0.0, show_default=True, help="Probability of a broken body."
)
@click.option("--connection-reset", default=0.0, show_default=True, help="Probability of a reset.")
@click.option(
    "--schema-violation",
    default=0.0,
    show_default=True,
    help="Probability that structured output breaks its schema.",
)
@click.option(
    "--context-tokens", type=int, default=None, help="Longest prompt accepted (400 beyond)."
)
@click.option("--api-key", default=None, help="Require this key (401 otherwise).")
@click.option("--model", "models", multiple=True, help="Accepted model (repeatable; default any).")
@click.option("--completion-tokens", default=40, show_default=True, help="Length of text answers.")
@click.option("--seed", default=0, show_default=True, help="Seed of answers, latency and faults.")
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


if __name__ == "__main__":  # pragma: no cover
    main()
