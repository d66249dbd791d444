"""The house's rules that a test can hold: the package's own imports sit at module level.

The layers themselves are import-linter's contract (pyproject.toml, run by
``.ci/run`` as ``lint-imports``); docs/architecture.md draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dask_llm

PACKAGE = Path(dask_llm.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_the_package(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == "dask_llm"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "dask_llm" for a in node.names)
    return False


def _internal_imports_in_functions(tree: ast.AST) -> list[int]:
    found: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if in_function and _imports_the_package(child):
                found.append(child.lineno)
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner)

    visit(tree, False)
    return found


def test_no_module_imports_the_package_inside_a_function() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _internal_imports_in_functions(ast.parse(path.read_text())))
    }
    assert offenders == {}


def test_each_subpackage_says_what_it_owns() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.parent.name}/__init__.py needs a docstring"
