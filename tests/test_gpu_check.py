"""tools/gpu_check.py's CPU dry run: the same code as on a GPU, on tiny shapes, ends with its one table."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import ROOT


def test_gpu_check_dry_run_on_cpu_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gpu_check.py"), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for check in ("loss: reference", "loss: fused_torch", "loss: fused_triton", "flash_attention_2 vs sdpa",
                  "tiny proxy (CPU dry run): step time, ZeRO-3, 1 device", "tiny proxy (CPU dry run): MFU",
                  "tiny proxy (CPU dry run): peak memory vs perceptio-plan", "tiny proxy (CPU dry run): loss finite"):
        assert check in rows, (check, proc.stdout[-3000:])
    assert "loss agrees" in rows["loss: fused_triton"] and "loss agrees" in rows["loss: fused_torch"]
    assert rows["tiny proxy (CPU dry run): loss finite"].rstrip().endswith("ok |")
    assert "skipped" in rows["flash_attention_2 vs sdpa"]  # no GPU here
    # the overhead baseline trains the same weights on the same samples: fp32 on CPU, the same first loss
    plain = re.search(r"first loss ([\d.]+) \(ZeRO-3: ([\d.]+)\)",
                      rows["tiny proxy (CPU dry run): plain PyTorch loop, same samples"])
    assert plain and abs(float(plain[1]) - float(plain[2])) <= 1e-5 * float(plain[2]), plain
    assert re.search(r"\| [\d.]+x \|", rows["tiny proxy (CPU dry run): ZeRO-3 step over the plain loop's"])


def test_gpu_check_refuses_cuda_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gpu_check.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_check_becomes_one_row_and_the_others_still_run():
    from .conftest import tools_module

    gpu_check = tools_module("gpu_check")

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    rows = [*gpu_check.isolated("attention", broken), *gpu_check.isolated("proxy", lambda: [{"check": "p", "result": "ok"}])]
    assert rows == [{"check": "attention", "result": "FAILED: RuntimeError: CUDA error: an illegal memory access was "
                                                       "encountered"},
                    {"check": "p", "result": "ok"}]


def test_a_row_past_its_time_limit_is_reported_and_the_next_one_runs():
    import time

    from .conftest import tools_module

    gpu_check = tools_module("gpu_check")
    started = time.perf_counter()
    rows = [*gpu_check.isolated("slow", lambda: time.sleep(30) or [], limit_s=1),
            *gpu_check.isolated("next", lambda: [{"check": "next", "result": "ok"}], limit_s=5)]
    assert time.perf_counter() - started < 10
    assert rows == [{"check": "slow", "result": "FAILED: TimeoutError: over its 1 s limit"},
                    {"check": "next", "result": "ok"}]
    assert sum(gpu_check.ROW_LIMITS_S.values()) <= 7 * 60 - 20  # the whole check within 7 minutes, with start-up


def test_the_gpu_checks_wheels_are_pinned_and_bring_their_own_dependencies():
    """tools/gpu_check_requirements.txt (generated from what the dry run imports) is installed with --no-deps: every
    wheel at constraints.txt's version, and every dependency they declare in the list or in the CUDA image."""
    from .conftest import tools_module

    gen = tools_module("gen_gpu_requirements")
    listed = dict(line.split("==", 1) for line in gen.listed_requirements())
    pins = gen.pinned()
    assert {name: pins.get(name) for name in listed} == listed
    missing = {n for n in gen.closure(set(listed)) if not gen.from_image(n)} - set(listed) - gen.OPTIONAL
    assert not missing, missing
    # The stack's own pins travel even where the image has another version; the image's own packages do not.
    assert {"deepspeed", "transformers", "sam2"} <= set(listed)
    assert not set(listed) & {"numpy", "safetensors", "torch", "triton", "ray", "pybullet", "wandb"}
