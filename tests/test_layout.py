"""The layout of the test suite (tests/README.md): topic directories hold only ``test_*.py`` files
and ``conftest.py``, shared code lives in ``tests/helpers/``, no module imports a test module or a
conftest, and no file is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    package = _dotted(path).rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_test_or_conftest(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return module.startswith("tests.") and (leaf.startswith("test_") or leaf == "conftest")


def test_topic_directories_hold_only_tests_and_conftest() -> None:
    misplaced = [
        str(p.relative_to(TESTS))
        for p in _modules()
        if "helpers" not in p.relative_to(TESTS).parts
        and not (p.name.startswith("test_") or p.name in ("conftest.py", "__init__.py"))
    ]
    assert misplaced == [], f"shared test code belongs in tests/helpers/: {misplaced}"


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    offenders = {
        str(p.relative_to(TESTS)): sorted(m for m in _imported(p) if _is_test_or_conftest(m))
        for p in _modules()
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert offenders == {}, f"move what they import to tests/helpers/: {offenders}"


def test_no_file_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(TESTS)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these by topic (at most {MAX_LINES} lines): {long}"
