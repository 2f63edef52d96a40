"""Run the fast tier (`pytest -m fast`) under coverage, subprocesses included, and report its wall time and the
package modules it never executes.

    python tools/fast_tier.py            # exit 1 if a module of perceptio_dist is never executed

A module counts as executed when a line inside one of its functions or methods runs, not merely its imports and
definitions. Coverage (coverage.py, its subprocess patch) sees the ranks, launchers and command-line tools the
tests start as well as the test process.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "perceptio_dist"


def function_lines(path: Path) -> set[int]:
    """Line numbers of the statements inside the module's functions and methods (their bodies, not the def)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for statement in node.body:
                for inner in ast.walk(statement):
                    if isinstance(inner, ast.stmt):
                        lines.add(inner.lineno)
    return lines


def only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def unexecuted(executed: dict[str, set[int]], package: Path = PACKAGE) -> list[str]:
    """Modules of the package with functions none of which ran, or without functions and never imported (a package
    marker holding only its docstring has nothing to execute)."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        if only_a_docstring(path):
            continue
        ran = executed.get(str(path.resolve()), set())
        inside = function_lines(path)
        if not (ran & inside if inside else ran):
            missing.append(str(path.relative_to(package.parent)))
    return missing


def run_fast_tier(extra: list[str]) -> tuple[float, int, dict[str, set[int]]]:
    """(seconds, pytest's exit status, executed lines per file)."""
    with tempfile.TemporaryDirectory() as folder:
        rc = Path(folder) / "coveragerc"
        rc.write_text(f"[run]\nsource = {PACKAGE}\nparallel = true\npatch = subprocess\n"
                      f"data_file = {Path(folder) / 'coverage'}\n")
        started = time.perf_counter()
        status = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-m",
                                 "fast", "-q", "-p", "no:cacheprovider", *extra], cwd=ROOT).returncode
        seconds = time.perf_counter() - started
        subprocess.run([sys.executable, "-m", "coverage", "combine", f"--rcfile={rc}", "-q"], cwd=ROOT, check=True)
        report = Path(folder) / "coverage.json"
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--rcfile={rc}", "-q", "-o", str(report)],
                       cwd=ROOT, check=True)
        files = json.loads(report.read_text())["files"]
    executed = {str((ROOT / name).resolve()): set(data["executed_lines"]) for name, data in files.items()}
    return seconds, status, executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="further pytest arguments")
    args = parser.parse_args()
    seconds, status, executed = run_fast_tier(args.pytest_args)
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if not only_a_docstring(p)]
    missing = unexecuted(executed)
    print(f"fast tier: {seconds:.0f} s, pytest exit {status}; {len(modules) - len(missing)} of {len(modules)} "
          f"modules of perceptio_dist executed")
    for name in missing:
        print(f"  never executed: {name}")
    raise SystemExit(1 if missing or status else 0)


if __name__ == "__main__":
    main()
