"""The ``dask-llm`` command line, end to end in subprocesses."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pandas as pd
import pytest

from dask_llm import cli

CHAINS = """
import os
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel
import dask_llm


class Note(BaseModel):
    note: str
    score: int


def chains():
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=os.environ["SIM_URL"])
    prompt = ChatPromptTemplate.from_template("A tasting note on {description}")
    return [dask_llm.Chain(prompt | llm.with_structured_output(Note), name="note")]
"""


# `python -m dask_llm`, with a short wait for an unreachable --scheduler (10 s by default)
MAIN = "import dask_llm.cli as cli; cli.CONNECT_TIMEOUT_S = 1.0; cli.run()"


def run(args: list[str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIM_URL": url, "DASK_LLM_CACHE": str(cwd / "cache.sqlite")}
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def run_here(
    args: list[str], url: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> subprocess.CompletedProcess[str]:
    """``run`` in this process, for errors found before any work: no interpreter to start.

    The same entry point (``cli.run``) with the same argv, environment and directory;
    the exit code is its ``SystemExit``'s, and a traceback would fail the test outright.
    """
    monkeypatch.setenv("SIM_URL", url)
    monkeypatch.setenv("DASK_LLM_CACHE", str(cwd / "cache.sqlite"))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dask-llm", *args])
    modules = set(sys.modules)
    capsys.readouterr()
    try:
        cli.run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        for name in set(sys.modules) - modules:  # the user's chains file, loaded by value
            if name.startswith("dask_llm_user_chains_"):
                module = sys.modules.pop(name)
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(module)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "chains.py").write_text(CHAINS)
    for k in range(2):
        pd.DataFrame(
            {"description": [f"plum {k}-{i}" for i in range(15)], "points": range(15)}
        ).to_csv(tmp_path / f"reviews-{k}.csv", index=False)
    return tmp_path


@pytest.mark.slow
def test_enrich_csv_glob_to_parquet(sim: Any, workdir: Path) -> None:
    result = run(
        [
            "enrich",
            "reviews-*.csv",
            "--chains",
            "chains.py:chains",
            "-o",
            "out",
            "--rpm",
            "6000",
            "--report",
            "run.html",
        ],
        sim.base_url,
        workdir,
    )
    assert result.returncode == 0, result.stderr
    report = (workdir / "run.html").read_text()
    assert "<svg" in report and "limit 6,000/min" in report and "report: run.html" in result.stdout
    out = pd.read_parquet(workdir / "out", dtype_backend="pyarrow")
    assert len(out) == 30
    assert out["llm_error"].isna().all()
    assert {"note", "score", "llm_input_tokens", "llm_output_tokens", "llm_cost_usd"} <= set(out)
    assert out["llm_input_tokens"].sum() == sim.stats()["prompt_tokens"]
    assert "wrote out" in result.stdout and "30 rows" in result.stdout


@pytest.mark.slow
def test_enrich_with_the_batch_api(make_simulator: Any, workdir: Path) -> None:
    sim = make_simulator(batch_validation_delay=0.05, batch_delay=0.2, batch_finalize_delay=0.05)
    result = run(
        [
            *("enrich", "reviews-*.csv", "--chains", "chains.py:chains", "-o", "out"),
            *("--batch", "--batch-poll", "0.1"),
        ],
        sim.base_url,
        workdir,
    )
    assert result.returncode == 0, result.stderr
    out = pd.read_parquet(workdir / "out", dtype_backend="pyarrow")
    assert len(out) == 30 and out["llm_error"].isna().all()
    assert sim.stats()["requests"] == 0 and sim.stats()["batch_lines_ok"] == 30
    assert "batches (" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(("--service-tier", "flex"), ("by tier: 30 Flex",), id="flex"),
        # Two hours: not enough for a batch's 24 h (the default assumption), plenty for Flex.
        pytest.param(
            ("--no-cache", "--deadline", "2h"), ("by tier: 30 Flex", "deadline met"), id="deadline"
        ),
    ],
)
def test_enrich_by_flex_or_a_deadline(
    sim: Any, workdir: Path, args: tuple[str, ...], says: tuple[str, ...]
) -> None:
    result = run(
        ["enrich", "reviews-*.csv", "--chains", "chains.py:chains", "-o", "out", *args],
        sim.base_url,
        workdir,
    )
    assert result.returncode == 0, result.stderr
    out = pd.read_parquet(workdir / "out", dtype_backend="pyarrow")
    assert len(out) == 30 and out["llm_error"].isna().all()
    assert sim.stats()["flex_answered"] == 30
    for text in says:
        assert text in result.stdout


def test_estimate_sends_nothing(
    sim: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_here(
        ["estimate", "reviews-*.csv", "--chains", "chains.py:chains", "--rpm", "600"],
        sim.base_url,
        workdir,
        monkeypatch,
        capsys,
    )
    assert result.returncode == 0, result.stderr
    assert "30 rows -> 30 calls" in result.stdout and "min" in result.stdout
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("rpm", "says", "code"),
    [
        pytest.param("openai=600", "wall time ~0.1 min (bound by openai's rpm=600)", 0, id="by"),
        pytest.param("anthropic=50", "no chain of this job calls it", 1, id="no-chain-calls"),
        pytest.param("openai=", "is not a limit", 2, id="unreadable"),
    ],
)
def test_estimate_takes_limits_by_provider(
    sim: Any,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rpm: str,
    says: str,
    code: int,
) -> None:
    args = ["estimate", "reviews-*.csv", "--chains", "chains.py:chains", "--no-cache"]
    result = run_here([*args, "--rpm", rpm], sim.base_url, workdir, monkeypatch, capsys)
    assert result.returncode == code, result.stderr
    assert says in result.stdout + result.stderr
    assert sim.stats()["requests"] == 0


def test_estimate_by_flex(
    sim: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["estimate", "reviews-*.csv", "--chains", "chains.py:chains", "--no-cache"]
    result = run_here([*args, "--service-tier", "flex"], sim.base_url, workdir, monkeypatch, capsys)
    assert result.returncode == 0, result.stderr
    assert "30 rows -> 30 calls" in result.stdout and "with Flex (list price: $" in result.stdout
    assert sim.stats()["requests"] == 0


def test_estimate_with_a_deadline(
    sim: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["estimate", "reviews-*.csv", "--chains", "chains.py:chains", "--no-cache"]
    soon = run_here([*args, "--deadline", "90m"], sim.base_url, workdir, monkeypatch, capsys)
    assert soon.returncode == 0, soon.stderr
    assert "online by Flex" in soon.stdout
    # Three days from now, as an ISO datetime: room for a batch's 24 h.
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat(timespec="minutes")
    far = run_here([*args, "--deadline", later], sim.base_url, workdir, monkeypatch, capsys)
    assert far.returncode == 0, far.stderr
    assert "Batch API, cut off" in far.stdout
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("5400", 5400, id="seconds"),
        pytest.param("90m", 5400, id="minutes"),
        pytest.param("2h", 7200, id="hours"),
        pytest.param("1h30m", 5400, id="hours-and-minutes"),
        pytest.param("1.5h", 5400, id="a-fraction"),
        pytest.param("1d", 86400, id="a-day"),
        pytest.param("2030-01-01T01:30+00:00", 5400, id="iso-datetime"),
        pytest.param("2030-01-01T02:30+01:00", 5400, id="iso-datetime-with-an-offset"),
    ],
)
def test_a_deadline_is_a_duration_or_a_datetime(text: str, seconds: float) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert (cli.deadline_of(text, now=now) - now).total_seconds() == seconds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["enrich", "missing.csv", "--chains", "chains.py:chains", "-o", "o"],
            "no such file: missing.csv",
            id="missing-file",
        ),
        pytest.param(
            ["enrich", "reviews-0.csv", "--chains", "chains.py:nope", "-o", "o"],
            "has no 'nope'",
            id="bad-chain-name",
        ),
        pytest.param(
            ["enrich", "reviews-0.csv", "--chains", "nochains", "-o", "o"],
            "MODULE.py:NAME",
            id="bad-chain-reference",
        ),
        pytest.param(
            [
                "enrich",
                "reviews-0.csv",
                "--chains",
                "chains.py:chains",
                "-o",
                "o",
                "--blocksize",
                "lots",
            ],
            "'lots' is not a size",
            id="bad-blocksize",
        ),
        pytest.param(
            ["enrich", "reviews-0.csv", "--chains", "chains.py:chains", "-o", "o", "--rpm", "-5"],
            "--rpm",
            id="negative-rpm",
        ),
        pytest.param(
            ["enrich", "*.csv", "--chains", "chains.py:chains", "-o", "o"],
            "has other columns than",
            id="csvs-with-different-columns",
        ),
        pytest.param(
            ["estimate", "reviews-0.csv", "--chains", "chains.py:chains", "--deadline", "soon"],
            "'soon' is not a deadline",
            id="unreadable-deadline",
        ),
        pytest.param(
            [
                *("estimate", "reviews-0.csv", "--chains", "chains.py:chains"),
                *("--deadline", "2020-01-01T00:00+00:00"),
            ],
            "is already past",
            id="past-deadline",
        ),
        pytest.param(
            [
                *("enrich", "reviews-0.csv", "--chains", "chains.py:chains", "-o", "o"),
                *("--deadline", "2h", "--batch"),
            ],
            "deadline= chooses",
            id="deadline-and-batch",
        ),
        pytest.param(["demo", "--rows", "-3"], "-3 is below 1", id="demo-negative-rows"),
        pytest.param(
            ["demo", "--input", "missing.csv"], "no such file: missing.csv", id="demo-missing-input"
        ),
    ],
)
def test_shell_errors_are_one_clear_line(
    sim: Any,
    workdir: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pd.DataFrame({"other": [1]}).to_csv(workdir / "zz-other.csv", index=False)
    result = run_here(args, sim.base_url, workdir, monkeypatch, capsys)
    assert_one_clear_line(result, message)
    assert sim.stats()["requests"] == 0  # found before anything was paid for


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_clear_line(sim: Any, workdir: Path) -> None:
    args = ["enrich", "reviews-0.csv", "--chains", "chains.py:chains", "-o", "o"]
    result = run([*args, "--scheduler", "tcp://127.0.0.1:9"], sim.base_url, workdir)
    assert_one_clear_line(result, "cannot reach the scheduler")
    assert sim.stats()["requests"] == 0  # found before anything was paid for


def assert_one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_output_is_written_atomically_and_never_mixes_runs(sim: Any, workdir: Path) -> None:
    args = ["enrich", "reviews-0.csv", "--chains", "chains.py:chains", "-o", "out"]
    first = run([*args[:1], "reviews-*.csv", *args[2:]], sim.base_url, workdir)
    assert first.returncode == 0, first.stderr
    assert len(pd.read_parquet(workdir / "out")) == 30
    refused = run(args, sim.base_url, workdir)
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr
    assert len(pd.read_parquet(workdir / "out")) == 30  # untouched
    replaced = run([*args, "--overwrite"], sim.base_url, workdir)
    assert replaced.returncode == 0, replaced.stderr
    assert len(pd.read_parquet(workdir / "out")) == 15  # only this run's rows
    assert sorted(p.name for p in workdir.iterdir() if "dask-llm" in p.name) == []


@pytest.mark.slow
def test_a_failed_run_leaves_the_previous_output_as_it_was(sim: Any, workdir: Path) -> None:
    ok = run(
        ["enrich", "reviews-0.csv", "--chains", "chains.py:chains", "-o", "out"],
        sim.base_url,
        workdir,
    )
    assert ok.returncode == 0, ok.stderr
    (workdir / "bad.py").write_text(
        "import dask_llm\n"
        "def fail(row: dict) -> str:\n"
        "    return str(1 / 0)\n"
        "def broken():\n"
        "    return [dask_llm.Chain(fail, inputs={'x': 'description'}, name='y')]\n"
    )
    failed = run(
        [
            "enrich",
            "reviews-1.csv",
            "--chains",
            "bad.py:broken",
            "-o",
            "out",
            "--overwrite",
            "--errors",
            "raise",
        ],
        sim.base_url,
        workdir,
    )
    assert failed.returncode == 1
    assert "ZeroDivisionError" in failed.stderr
    out = pd.read_parquet(workdir / "out")
    assert out["description"].str.startswith("plum 0-").all()  # the first run, whole
    assert sorted(p.name for p in workdir.iterdir() if "dask-llm" in p.name) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("simulator_options", "args", "code", "why"),
    [
        pytest.param({"api_key": "sk-another"}, [], 3, "401", id="fatal-answer"),
        pytest.param({}, ["--budget-usd", "0.0001"], 4, "budget", id="budget"),
    ],
)
def test_a_job_that_stopped_exits_non_zero(
    make_simulator: Any,
    workdir: Path,
    simulator_options: dict[str, Any],
    args: list[str],
    code: int,
    why: str,
) -> None:
    sim = make_simulator(**simulator_options)
    result = run(
        ["enrich", "reviews-*.csv", "--chains", "chains.py:chains", "-o", "out", *args],
        sim.base_url,
        workdir,
    )
    assert result.returncode == code, result.stderr
    assert "dask-llm: stopped:" in result.stderr and why in result.stderr
    assert f"rows failed (their llm_error says why; rerun to resume); exit {code}" in result.stderr
    out = pd.read_parquet(workdir / "out")  # what was done is written all the same
    assert len(out) == 30 and out["llm_error"].notna().any()


def test_a_report_into_a_missing_directory_is_refused_before_any_request(
    sim: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 28: it failed only after every call was paid.
    args = ["enrich", "reviews-*.csv", "--chains", "chains.py:chains", "-o", "out"]
    result = run_here(
        [*args, "--report", "missing/run.html"], sim.base_url, workdir, monkeypatch, capsys
    )
    assert result.returncode != 0
    assert "--report" in result.stderr and "does not exist" in result.stderr
    assert sim.stats()["requests"] == 0
    assert not (workdir / "out").exists()


@pytest.mark.slow
def test_the_demo_says_its_sequential_time_is_extrapolated(sim: Any, workdir: Path) -> None:
    # Issue 28: "X s for 6 rows" was timed on 2 rows without saying so.
    args = ["demo", "--rows", "6", "--sequential-rows", "2", "--base-url", sim.base_url]
    result = run([*args, "--output", "demo.parquet", "--no-progress"], sim.base_url, workdir)
    assert result.returncode == 0, result.stderr
    assert "extrapolated from 2 rows" in result.stdout
    assert "speedup over sequential (extrapolated from 2 rows)" in result.stdout
