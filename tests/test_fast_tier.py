"""The fast tier (tests/fast_tier.py): its measuring tool judged by hand on a small package, and, as a slow check,
the tier itself executing every module of perceptio_dist."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, tools_module


def test_a_module_counts_as_executed_only_when_one_of_its_functions_ran(tmp_path):
    tool = tools_module("fast_tier")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""Only a docstring: nothing to execute."""\n')
    (package / "used.py").write_text("import os\n\n\ndef f():\n    x = 1\n    return x\n")  # body: lines 5, 6
    (package / "imported.py").write_text("import os\n\n\ndef g():\n    return 2\n")  # body: line 5
    (package / "constants.py").write_text("A = 1\nB = 2\n")  # no function: executed when imported
    (package / "unused.py").write_text("C = 3\n")
    assert tool.function_lines(package / "used.py") == {5, 6}
    executed = {str((package / "used.py").resolve()): {1, 4, 6}, str((package / "imported.py").resolve()): {1, 4},
                str((package / "constants.py").resolve()): {1, 2}}
    # imported.py ran its definitions but no function body; unused.py was never imported.
    assert tool.unexecuted(executed, package) == ["pkg/imported.py", "pkg/unused.py"]


@pytest.mark.slow
def test_the_fast_tier_executes_every_module_of_the_package():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fast_tier.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    summary = proc.stdout[proc.stdout.rfind("fast tier:"):]
    assert proc.returncode == 0, summary or proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "never executed" not in summary
