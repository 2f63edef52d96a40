"""Golden losses: the tiny recipe's first 10 steps on 2 ranks (ZeRO-3), every logged term, compared exactly.

torch, DeepSpeed and transformers are pinned (constraints.txt) and the shards are byte-reproducible, so any
change of the numbers (a refactor that reorders a reduction, a changed default, a different sample order)
shows here. A change that is meant to move them regenerates the file and says why in its commit:

    PERCEPTIO_WRITE_GOLDEN=1 ./run_tests.sh tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conftest import NO_TOKENIZER, read_metrics, run_ranks

GOLDEN = Path(__file__).parent / "golden" / "tiny_cpu_2ranks_10steps.json"
KEYS = ("loss", "loss/text", "loss/marker", "loss/token", "loss/count", "loss/reconstruction", "loss/mask",
        "grad_norm", "lr")


def test_tiny_recipe_reproduces_its_golden_losses(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    run_ranks(2, ["--recipe", "tiny_cpu", "train.max_steps=10", f"data.shards={tiny_shards}", NO_TOKENIZER,
                  f"logging.output_dir={run_dir}", "logging.wandb=disabled", "checkpoint.save_final=false"],
              timeout=600)
    observed = [{key: m[key] for key in KEYS} for m in read_metrics(run_dir)]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 11))
    if os.environ.get("PERCEPTIO_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(observed, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())
    for step, (got, want) in enumerate(zip(observed, expected), start=1):
        assert got == want, f"step {step}: {got} != golden {want} (see this file's docstring to regenerate)"
    assert len(observed) == len(expected)
