"""The run report: one self-contained HTML file of plots and tables, readable offline.

``last_run().report("run.html")`` (and ``dask-llm enrich --report run.html``)
draws the run record (``observe.record``): throughput against the limit, requests
in flight, 429s, retries and errors over time, latency per chain, cumulative
cost against the estimate and the budget, and a table of errors with sample
rows. In a notebook, ``last_run()`` renders the same (``_repr_html_``).

Why matplotlib, drawing inline SVG. The file must open anywhere, offline,
years later, and be small enough to attach to a ticket. JavaScript plotting
libraries (plotly, bokeh, altair) either load their runtime from a CDN (not
offline) or inline it (3-4 MB of JavaScript per file, before any data), and
need a browser that runs it. matplotlib draws SVG: vector, a few hundred KB
for six panels, no script at all, the same figure saves as the PNG shown in
the docs, and it installs from PyPI as wheels on every platform CI uses.
Text stays text (``svg.fonttype="none"``), which keeps the file small and
searchable; the browser's sans-serif draws it. Figures are built with
``matplotlib.figure.Figure`` directly, never ``pyplot``: no global state, no
GUI backend, safe from any thread.
"""

from __future__ import annotations

import html
import io
import itertools
import os
from typing import TYPE_CHECKING, Any

from dask_llm.observe.record import LATENCY_EDGES_S, RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dask_llm.observe.progress import RunSummary

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;
max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.summary{background:#f6f8fa;padding:.6em 1em;border-radius:4px}
.stop{color:#a00;font-weight:bold} svg{max-width:100%;height:auto}
"""


def estimate_usd(estimate: Any) -> float | None:
    """US dollars from an ``Estimate``, a ``Pilot`` or a number (None: none given)."""
    if estimate is None:
        return None
    if isinstance(estimate, int | float):
        return float(estimate)
    for name in ("projected_cost_usd", "cost_usd"):
        value = getattr(estimate, name, None)
        if value is not None:
            return float(value)
    raise TypeError(
        f"estimate= takes an Estimate, a Pilot or US dollars, not {type(estimate).__name__}"
    )


def figure(summary: RunSummary, *, estimate: Any = None) -> Figure:
    """The report's six panels, as a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    record = summary.record or RunRecord()
    series = record.series()
    width = record.width
    t = series["t"]
    fig = Figure(figsize=(12, 10.5), layout="constrained")
    axes = fig.subplots(3, 2)
    unit = f" (per {width} s bucket)" if width > 1 else ""

    ax = axes[0][0]
    ax.set_title("Throughput against the limit")
    if t:
        ax.plot(t, [x / width for x in series["started"]], label="sent /s", lw=1)
        ax.plot(t, [x / width for x in series["finished"]], label="answered /s", lw=1)
    limit = record.limit_per_s
    if limit:
        ax.axhline(limit, color="red", ls="--", lw=1, label=f"limit {limit * 60:,.0f}/min")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests per second")
    _legend(ax, "upper right")

    ax = axes[0][1]
    ax.set_title("Requests in flight (mean over each bucket)")
    if t:
        ax.fill_between(t, series["in_flight"], step="post", alpha=0.4)
        ax.step(t, series["in_flight"], where="post", lw=1)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests on the wire")

    ax = axes[1][0]
    ax.set_title("429s, retries and errors" + unit)
    if t:
        ax.plot(t, series["rate_limited"], label="429 rate limit", lw=1)
        ax.plot(t, series["other_429"], label="429 other", lw=1)
        ax.plot(t, series["retries"], label="retries", lw=1, ls="--")
        for kind, counts in record.error_series().items():
            if not kind.startswith("429"):
                ax.plot(t, counts, label=f"error {kind}", lw=1, ls=":")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("count")
    _legend(ax, "upper right")

    ax = axes[1][1]
    ax.set_title("Latency per chain")
    edges = [LATENCY_EDGES_S[0] / 1.12, *LATENCY_EDGES_S]
    colors = itertools.cycle(["C0", "C1", "C2", "C3", "C4", "C5"])
    for name, chain in record.chains.items():
        if not chain.latency:
            continue
        color = next(colors)
        lo, hi = min(chain.latency), max(chain.latency)
        xs = [edges[min(b, len(edges) - 1)] for b in range(lo, hi + 2)]
        ys = [chain.latency.get(b, 0) for b in range(lo, hi + 1)]
        ax.stairs(ys, xs, label=name, color=color)
        p50, p90 = chain.percentile(50), chain.percentile(90)
        if p50 is not None and p90 is not None:
            ax.axvline(p50, color=color, lw=0.8, ls="--")
            ax.axvline(p90, color=color, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (dashed: p50, dotted: p90)")
    ax.set_ylabel("requests")
    _legend(ax, "upper right")

    ax = axes[2][0]
    ax.set_title("Cumulative cost")
    if t:
        ax.plot(t, list(itertools.accumulate(series["cost_usd"])), label="spent", lw=1.5)
    expected = estimate_usd(estimate)
    if expected is not None:
        ax.axhline(expected, color="gray", ls="--", lw=1, label=f"estimate ${expected:,.4g}")
    if record.budget_usd is not None:
        ax.axhline(record.budget_usd, color="red", lw=1, label=f"budget ${record.budget_usd:,.4g}")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("US dollars")
    _legend(ax, "lower right")

    ax = axes[2][1]
    ax.set_title("Cost and tokens per chain")
    names = list(record.chains)
    if names:
        costs = [record.chains[n].cost_usd for n in names]
        ax.barh(names, costs, color="C0")
        for y, n in enumerate(names):
            c = record.chains[n]
            ax.annotate(
                f" {c.input_tokens:,} in / {c.output_tokens:,} out",
                (costs[y], y),
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, max(costs) * 1.7 or 1.0)
        ax.invert_yaxis()
    ax.set_xlabel("US dollars")
    return fig


def _legend(ax: Any, loc: str) -> None:
    """A legend where a panel has labelled lines (an empty run has none: no warning)."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc=loc, fontsize=8)


def _svg(fig: Figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dask-llm"}):
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline: no XML prolog or doctype


def render_html(summary: RunSummary, *, estimate: Any = None, standalone: bool = True) -> str:
    """The report as HTML: a whole page, or (``standalone=False``) a notebook fragment."""
    record = summary.record or RunRecord()
    e = html.escape
    parts = [f"<style>{_STYLE}</style>"] if standalone else []
    parts.append("<h1>dask-llm run report</h1>")
    parts.append(f'<p class="summary">{e(str(summary))}</p>')
    if summary.status != "completed":
        parts.append(f'<p class="stop">{e(summary.status)}</p>')
    parts.append(_svg(figure(summary, estimate=estimate)))
    parts.append(_chain_table(record))
    parts.append(_error_table(record))
    body = "\n".join(parts)
    if not standalone:
        return f'<div class="dask-llm-report">{body}</div>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>dask-llm run report</title></head>\n<body>\n"
        f"{body}\n</body></html>\n"
    )


def _chain_table(record: RunRecord) -> str:
    def seconds(x: float | None) -> str:
        return "" if x is None else f"{x:.3g} s"

    rows = []
    for name, c in record.chains.items():
        cost = f"${c.cost_usd:,.4f}" + (" + unpriced" if c.unpriced else "")
        rows.append(
            f'<tr><td class="l">{html.escape(name)}</td><td>{c.calls:,}</td><td>{c.ok:,}</td>'
            f"<td>{seconds(c.percentile(50))}</td><td>{seconds(c.percentile(90))}</td>"
            f"<td>{seconds(c.percentile(99))}</td><td>{c.input_tokens:,}</td>"
            f"<td>{c.cached_tokens:,}</td><td>{c.output_tokens:,}</td><td>{cost}</td>"
            f"<td>${c.saved_usd:,.4f}</td><td>{c.flex:,} / {c.batch:,} / {c.unavailable:,}</td>"
            f"<td>${c.flex_cost_usd:,.4f} / ${c.batch_cost_usd:,.4f} / "
            f"${c.cost_usd - c.flex_cost_usd - c.batch_cost_usd:,.4f}</td>"
            f"<td>{c.truncated:,}</td>"
            f"<td>{c.refused:,}</td><td>{c.parse_failures:,}</td></tr>"
        )
    head = (
        '<tr><th class="l">chain</th><th>requests</th><th>answers</th><th>p50</th><th>p90</th>'
        "<th>p99</th><th>input tokens</th><th>of them cached</th><th>output tokens</th>"
        "<th>cost</th><th>caching saved</th><th>by Flex / batch / Flex unavailable</th>"
        "<th>cost by Flex / batch / list price</th>"
        "<th>truncated</th><th>refused</th><th>parse failures</th></tr>"
    )
    return f"<h2>Chains</h2><table>{head}{''.join(rows)}</table>"


def _error_table(record: RunRecord) -> str:
    e = html.escape
    totals: dict[str, int] = {}
    for counts in record.errors.values():
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
    requests = "".join(
        f'<tr><td class="l">{e(kind)}</td><td>{n:,}</td></tr>' for kind, n in sorted(totals.items())
    )
    parts = ["<h2>Errors</h2>"]
    if requests:
        parts.append(
            '<table><tr><th class="l">failed requests, by kind</th><th>count</th></tr>'
            f"{requests}</table>"
        )
    rows = []
    for kind, n in sorted(record.row_errors.items(), key=lambda kv: -kv[1]):
        samples = record.samples.get(kind, [])
        cells = "<br>".join(f"row {e(label)}: {e(message)}" for label, message in samples)
        rows.append(
            f'<tr><td class="l">{e(kind)}</td><td>{n:,}</td><td class="l">{cells}</td></tr>'
        )
    if rows:
        parts.append(
            '<table><tr><th class="l">failed rows, by kind</th><th>rows</th>'
            f'<th class="l">sample rows (llm_error)</th></tr>{"".join(rows)}</table>'
        )
    if len(parts) == 1:
        parts.append("<p>No errors.</p>")
    return "".join(parts)


def write_report(summary: RunSummary, path: str | os.PathLike[str], *, estimate: Any = None) -> str:
    """Write ``summary``'s report to ``path``: HTML, or the plots alone for .png/.svg/.pdf."""
    target = os.fspath(path)
    suffix = os.path.splitext(target)[1].lower()
    if suffix in (".png", ".svg", ".pdf"):
        figure(summary, estimate=estimate).savefig(target, dpi=100)
        return target
    with open(target, "w", encoding="utf-8") as f:
        f.write(render_html(summary, estimate=estimate))
    return target
