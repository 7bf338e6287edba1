"""The architecture holds: import-linter's contracts (pyproject.toml), and imports at module top.

An import inside a function hides a dependency (and, between sibling modules, an import circle)
from readers and from import-linter. Only the heavy optional dependencies of LAZY_ALLOWED may load
lazily, so that `gan-job --help`, `bench` and the workers' start-up stay fast: the rule is stated
once, in docs/architecture.md, not on each such line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("job", "gan")
# Dependencies heavy or optional enough to load only where used (docs/architecture.md#the-layers).
LAZY_ALLOWED = (
    "ray",
    "boto3",
    "botocore",
    "pyarrow",
    "torchmetrics",
    "matplotlib",
    "tensorboardX",
    "torchvision",
    "yaml",
    "torch_fidelity",
)


def test_lint_imports_keeps_every_contract():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and " 0 broken" in report, report[-3000:]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function of `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                found |= {(inner.lineno, alias.name) for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom):
                found.add((inner.lineno, "." * inner.level + (inner.module or "")))
    return sorted(found)


def test_imports_are_at_module_top_but_for_heavy_optional_dependencies():
    problems = [
        f"{path.relative_to(ROOT)}:{line}: `{module}` imported inside a function; move it to the module's top"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in function_level_imports(path)
        if module.split(".")[0] not in LAZY_ALLOWED
    ]
    assert problems == [], "\n".join(problems)


# Kept off `gan-job --help`'s start-up: each is seconds to import, or optional.
NOT_AT_START_UP = ("ray", "boto3", "botocore", "pyarrow", "torchmetrics", "matplotlib", "tensorboardX")


def test_the_cli_starts_without_ray_s3_clients_torchmetrics_or_matplotlib():
    """cli.py imports every command at its top;
    the commands (and gan.metrics, gan.plots) keep these inside functions."""
    code = f"import sys, job.cli; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_AT_START_UP!r})))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


MAX_LINE = 120  # the house rule, as ruff's line-length in pyproject.toml


def test_no_python_line_is_longer_than_120_characters():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = listed.stdout.split()
    long = [
        f"{path}:{number}: {len(line)} characters"
        for path in tracked
        for number, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if len(line) > MAX_LINE
    ]
    assert long == [], "\n".join(long)


MAX_FUNCTION_LINES = 70  # the house rule: a function reads on one screen


def test_no_function_of_the_package_is_longer_than_70_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], "\n".join(long)


def test_the_package_is_formatted_without_exceptions():
    """No `# fmt: skip`: the formatter's layout is the house layout (ruff format, line length 120)."""
    skipped = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: skip" in line
    ]
    assert skipped == [], "\n".join(skipped)
