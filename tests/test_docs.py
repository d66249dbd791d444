"""Every ``python`` snippet in docs/ and the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def snippets() -> list[object]:
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for k, code in enumerate(FENCE.findall(page.read_text())):
            # A cluster, a subprocess, or pacing at a low rate: seconds each.
            slow = any(word in code for word in ("LocalCluster(", "subprocess")) or (
                "rpm=" in code and "enrich(" in code
            )
            marks = [pytest.mark.slow] if slow else []
            found.append(pytest.param(code, id=f"{page.stem}-{k}", marks=marks))
    return found


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_every_concept_has_a_page() -> None:
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {
        "chains",
        "rate-limits",
        "cache",
        "cluster",
        "simulator",
        "cli",
        "errors",
        "report",
    } <= pages
