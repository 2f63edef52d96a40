"""The GPU-only paths in one command and one table: fused LM-head loss, flash-attention, and an 8B-width proxy
trained with ZeRO-3 against the planner's memory prediction. About 6 minutes on one H100/H200.

    python tools/gpu_check.py                 # on a GPU machine: the figures for the README
    python tools/gpu_check.py --device cpu    # the same code on tiny shapes (the test suite runs this)

Rows:

1. Fused LM-head loss, forward + backward at hidden 4096 x vocabulary 151,936 + 131 spatial tokens x 8,192 tokens,
   bf16: the reference (full logits), chunked torch, the Triton kernels, and Liger-Kernel's and Apple's Cut
   Cross-Entropy where installed, each in its own process (tools/bench_fused_loss.py); time and peak memory, ratios
   against the reference. Goal: Triton at <= 0.7x the reference's time and <= 10 % of its memory.
2. Attention: the tiny model in bf16 with flash_attention_2 and with SDPA from the same weights, on the same packed
   batch; the two losses must agree (flash-attn's varlen path is what packing uses on GPUs).
3. 8B-width proxy: the 8B recipe's widths (text 4096 x 4 decoder layers, the whole InternViT-300M, SAM2.1 Hiera-L's
   head, K=128 10x10 depth tokenizer; random weights) trained for a few steps on one GPU with ZeRO-3, bf16 and
   activation checkpointing, through the trainer's own pieces (DeepSpeed config, partitioned construction, training
   module, optimizer): step time, tokens/s, MFU by train/flops.py, peak memory against perceptio-plan's prediction
   for the same proxy. Goal: MFU >= 45 %.
4. The stack's overhead (issue 18): the same proxy, weights and samples in a plain PyTorch loop (bf16 weights, torch
   AdamW, no DeepSpeed, no fp32 master copy: a lower bound on a hand-written loop's cost); step time and the
   ZeRO-3 run's ratio over it. Goal: <= 1.10x. Both loops' first losses are printed: they must agree.

Wheels beyond a stock CUDA PyTorch image (its torch and triton are used as they are; Python 3.12), measured from
what the dry run imports by tools/gen_gpu_requirements.py (tools/gpu_check_requirements.txt, about 19 MiB):

    python tools/gen_gpu_requirements.py --wheels .whl                       # where pip reaches PyPI
    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl   # on the GPU machine, offline
    PYTHONPATH=/tmp/site python3 tools/gpu_check.py

This package itself needs no install: the check imports it from the checkout. Optional rows: flash-attn,
liger-kernel, cut-cross-entropy, where their wheels are installed; without flash-attn the attention row reports
itself skipped. Each row is isolated and has a time limit (ROW_LIMITS_S, 400 s in all on a GPU): a failing or
overrunning one prints its error in the table, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

PROXY_8B = ["model.backbone.pretrained_path=null", "model.backbone.tokenizer=builtin:tiny_bpe",
            "model.backbone.text.num_layers=4", "model.seg_head.sam2_checkpoint=null",
            "model.depth_vqvae.checkpoint=null", "data.shards=null", "train.micro_batch_size=1",
            "train.grad_accum_steps=1", "model.backbone.attn_implementation=auto"]
PROXY_CPU = ["model.depth_vqvae.checkpoint=null", "data.shards=null", "train.micro_batch_size=1",
             "train.grad_accum_steps=1", "train.activation_checkpointing=true"]
PROXY_MIX = [(1.0, 5, 40)]  # every proxy sample: 4 tiles + thumbnail, a depth block half the time, 40 answer words


# ------------------------------------------------------------------------------------------------- 1. loss


def check_fused_loss(cpu: bool, limit_s: int | None = None) -> list[dict]:
    shape = (["--tokens", "512", "--hidden", "32", "--vocab", "500", "--chunk", "64", "--dtype", "fp32"] if cpu else
             ["--tokens", "8192", "--hidden", "4096", "--dtype", "bf16", "--device", "cuda"])
    impls = ["reference", "fused_torch", "fused_triton"]
    for module, name in (("liger_kernel", "liger"), ("cut_cross_entropy", "cce")):
        if not cpu and _importable(module):
            impls.append(name)
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if cpu else {})}
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_fused_loss.py"), *shape, "--impls", *impls],
                          capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=None if limit_s is None else limit_s - 5)  # ends before the row's alarm
    if proc.returncode:
        return [{"check": "fused LM-head loss", "result": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    ref = out["results"]["reference"]
    rows = []
    for impl, r in out["results"].items():
        if "error" in r:
            rows.append({"check": f"loss: {impl}", "result": r["error"]})
            continue
        ratio = "" if impl == "reference" else (f" ({r['seconds'] / ref['seconds']:.2f}x time, "
                                                f"{r['peak_above_inputs_mb'] / max(ref['peak_above_inputs_mb'], 1e-9):.1%} "
                                                f"memory; loss diff {abs(r['loss'] - ref['loss']):.2e})")
        goal = result = ""
        agrees = abs(r["loss"] - ref["loss"]) <= 2e-2 * abs(ref["loss"])  # bf16 on GPUs; fp32 agrees far closer
        if impl in ("fused_torch", "fused_triton"):
            result = "loss agrees" if agrees else "LOSS DIFFERS"
        if impl == "fused_triton" and not cpu:
            goal = "<= 0.7x time, <= 10 % memory"
            met = (r["seconds"] <= 0.7 * ref["seconds"]
                   and r["peak_above_inputs_mb"] <= 0.1 * ref["peak_above_inputs_mb"])
            result += "; goal met" if met else "; goal not met"
        rows.append({"check": f"loss: {impl}", "figure": f"{r['seconds']:.3f} s, {r['peak_above_inputs_mb']:.0f} MB"
                     + ratio, "goal": goal, "result": result})
    return rows


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -------------------------------------------------------------------------------------------- 2. attention


def check_attention(device) -> dict:
    import torch

    from bench_packing import sample_stream
    from perceptio_dist.config.training import load_config
    from perceptio_dist.data.packing import pack
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer
    from perceptio_dist.parallel.zero import PerceptioTrainingModule

    if device.type != "cuda" or not _importable("flash_attn"):
        return {"check": "flash_attention_2 vs sdpa", "result": "skipped: needs a GPU and flash-attn"}
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        cfg = load_config("tiny_cpu", ["model.depth_vqvae.checkpoint=null", "data.shards=null",
                                       f"model.backbone.attn_implementation={attn}", "model.backbone.max_tiles=13"])
        tokenizer = load_tokenizer(cfg.model.backbone)
        torch.manual_seed(0)
        model = build_perceptio(cfg.model, tokenizer, torch.bfloat16, seed=0).to(device).eval()
        batch = pack(sample_stream(cfg, tokenizer, model, 8), cfg.data.max_seq_len, 0).to(device)
        batch.pixel_values = batch.pixel_values.to(torch.bfloat16)
        module = PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                         LMHeadTermsModule("fused_torch"))
        with torch.no_grad():
            losses[attn] = float(module(**batch.as_dict())[0])
    diff = abs(losses["flash_attention_2"] - losses["sdpa"]) / abs(losses["sdpa"])
    return {"check": "flash_attention_2 vs sdpa (tiny, bf16, packed)",
            "figure": f"loss {losses['flash_attention_2']:.4f} vs {losses['sdpa']:.4f} ({diff:.1e} relative)",
            "goal": "within 2e-2 (bf16)", "result": "ok" if diff < 2e-2 else "DIFFERS"}


# ------------------------------------------------------------------------------------------------ 3. proxy


def check_proxy(device, steps: int) -> list[dict]:
    import torch

    from bench_packing import sample_stream
    from perceptio_dist.config.training import load_config
    from perceptio_dist.model.tokenizer import load_tokenizer
    from perceptio_dist.parallel.deepspeed_config import build_deepspeed_config
    from perceptio_dist.parallel.distributed import init_distributed
    from perceptio_dist.parallel.zero import partitioned_construction, register_external_parameters
    from perceptio_dist.plan import Cluster, model_sizes, plan
    from perceptio_dist.train.flops import device_peak_tflops, flops_model_for
    from perceptio_dist.train.optim import build_optimizer
    from perceptio_dist.train.trainer import seed_everything

    import deepspeed

    cpu = device.type != "cuda"
    recipe, overrides = ("tiny_cpu", PROXY_CPU) if cpu else ("perceptio_8b", PROXY_8B)
    cfg = load_config(recipe, overrides)
    dist = init_distributed("auto")
    ds_config = build_deepspeed_config(cfg, 1)
    tokenizer = load_tokenizer(cfg.model.backbone)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    seed_everything(cfg.train.seed)
    with partitioned_construction(ds_config, enabled=cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init):
        module = training_module(cfg, tokenizer, dtype, device)
    model = module.model
    if cfg.parallel.zero_stage == 3:
        register_external_parameters(module.external_parameters())
    samples = list(sample_stream(cfg, tokenizer, model, steps + 2, mix=PROXY_MIX))
    # The baseline trains the same initial weights (partitioned construction draws them differently) on the same
    # samples.
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=cfg.parallel.zero_stage == 3):
        initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    plain_s, plain_first_loss = plain_loop_step_s(cfg, tokenizer, samples, dist.device, dtype, initial)
    del initial
    optimizer, scheduler = build_optimizer(module, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    flops = flops_model_for(model)
    peak_tflops, peak_source = device_peak_tflops(dist.device, cfg.logging.peak_tflops_per_device)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens, work = [], 0, 0.0
    seed_everything(cfg.train.seed)
    for i, sample in enumerate(samples):
        batch = proxy_batch(sample, tokenizer, dist.device, dtype)
        start = time.perf_counter()
        loss, _, _ = engine(**batch.as_dict())
        engine.backward(loss)
        engine.step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first_loss = float(loss)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
            tokens += batch.num_tokens
            work += flops.step_flops(batch.sample_lengths, batch.pixel_values.shape[0], target_rows=batch.num_targets)
    seconds = sum(times)
    # Like for like: the plan for samples as the proxy's are (its longest, its tiles), not the recipe's 8,192-token,
    # 13-tile worst case.
    longest = max(len(s.input_ids) for s in samples)
    tiles = max(s.pixel_values.shape[0] for s in samples)
    sizes = model_sizes(load_config(recipe, [*overrides, f"data.max_seq_len={longest}",
                                             f"model.backbone.max_tiles={max(1, tiles - 1)}"]),
                        mean_sample_tokens=longest)
    memory_gb = torch.cuda.get_device_properties(dist.device).total_memory / 2**30 if not cpu else 24.0
    predicted = {p.layout: p for p in plan(sizes, Cluster(nodes=1, gpus_per_node=1, gpu_memory_gb=memory_gb,
                                                          reserve_gb=0), 1, [])}["zero3"]
    predicted_gb = predicted.model_states_gb + predicted.activations_per_sample_gb
    measured = (f"{torch.cuda.max_memory_allocated(dist.device) / 2**30:.1f} GB" if not cpu
                else "n/a on CPU (no allocator statistics)")
    mfu = work / seconds / (peak_tflops * 1e12)
    name = "8B-width proxy" if not cpu else "tiny proxy (CPU dry run)"
    return [
        {"check": f"{name}: step time, ZeRO-3, 1 device", "figure": f"{seconds / len(times):.3f} s/step, "
         f"{tokens / seconds:.0f} tokens/s ({len(times)} steps of {tokens // len(times)} tokens)"},
        {"check": f"{name}: MFU", "figure": f"{mfu:.1%} of {peak_tflops:.1f} TFLOP/s ({peak_source})",
         "goal": ">= 45 %" if not cpu else "", "result": "" if cpu else ("ok" if mfu >= 0.45 else "below goal")},
        {"check": f"{name}: peak memory vs perceptio-plan", "figure": f"measured {measured}, predicted "
         f"{predicted_gb:.1f} GB (model states {predicted.model_states_gb:.1f} + activations "
         f"{predicted.activations_per_sample_gb:.2f}) for samples of {longest} tokens and {tiles} tiles"},
        {"check": f"{name}: loss finite", "result": "ok" if bool(torch.isfinite(loss.detach()).all()) else "NOT FINITE"},
        {"check": f"{name}: plain PyTorch loop, same samples", "figure": f"{plain_s:.3f} s/step; first loss "
         f"{plain_first_loss:.6f} (ZeRO-3: {first_loss:.6f})"},
        {"check": f"{name}: ZeRO-3 step over the plain loop's", "figure": f"{seconds / len(times) / plain_s:.2f}x",
         "goal": "<= 1.10x" if not cpu else "",
         "result": "" if cpu else ("ok" if seconds / len(times) <= 1.10 * plain_s else "above goal")},
    ]


def training_module(cfg, tokenizer, dtype, device):
    """The proxy as the trainer builds it: the model (activation checkpointing as configured), objective, and the
    LM-head back end the trainer picks for ``device`` (Triton on a GPU)."""
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.parallel.zero import PerceptioTrainingModule

    model = build_perceptio(cfg.model, tokenizer, dtype, seed=cfg.train.seed).train()
    if cfg.train.activation_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                   LMHeadTermsModule.from_config(cfg.objective, device, vocab_size=len(tokenizer)))


def proxy_batch(sample, tokenizer, device, dtype):
    from perceptio_dist.data.batch import collate

    batch = collate([sample], tokenizer.pad_token_id).to(device)
    batch.pixel_values = batch.pixel_values.to(dtype)
    return batch


def plain_loop_step_s(cfg, tokenizer, samples, device, dtype, initial: dict) -> tuple[float, float]:
    """(median step time after two warm-up steps, first loss): the proxy with the ``initial`` weights trained on the
    same samples by a plain loop; freed before the ZeRO-3 engine takes the memory."""
    import gc
    import statistics

    import torch

    from bench_trainer import plain_step
    from perceptio_dist.train.optim import build_optimizer
    from perceptio_dist.train.trainer import seed_everything

    module = training_module(cfg, tokenizer, dtype, device).to(device)
    module.load_state_dict(initial)
    optimizer, scheduler = build_optimizer(module, cfg.train)
    times, first_loss = [], None
    seed_everything(cfg.train.seed)  # the objective's random mask points: as in the ZeRO-3 run's first step
    for sample in samples:
        batch = proxy_batch(sample, tokenizer, device, dtype)
        start = time.perf_counter()
        loss = plain_step(module, optimizer, scheduler, [batch], cfg.train.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_loss = float(loss) if first_loss is None else first_loss
        times.append(time.perf_counter() - start)
    del module, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[2:]), first_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=None, help="timed proxy steps (default 5 on a GPU, 2 on CPU)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu for the dry run on tiny shapes")
    device = torch.device(args.device)
    steps = args.steps or (2 if args.device == "cpu" else 5)
    started = time.perf_counter()
    limits = ROW_LIMITS_S if args.device == "cuda" else {}  # the CPU dry run's time is the suite's concern
    rows = isolated("fused LM-head loss", lambda: check_fused_loss(cpu=args.device == "cpu",
                                                                   limit_s=limits.get("loss")),
                    limits.get("loss"))
    rows += isolated("attention", lambda: [check_attention(device)], limits.get("attention"))
    rows += isolated("8B-width proxy", lambda: check_proxy(device, steps), limits.get("proxy"))
    title = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU dry run (tiny shapes)"
    print(f"\n{title}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| check | figure | goal | result |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['check']} | {r.get('figure', '')} | {r.get('goal', '')} | {r.get('result', '')} |")
    if any(str(r.get("result", "")).startswith("FAILED") for r in rows):
        raise SystemExit(1)


# Seconds per row on a GPU, so the whole check ends within 7 minutes (about 6 when all goes well); a row past its
# limit is reported as failed and the next one runs.
ROW_LIMITS_S = {"loss": 150, "attention": 60, "proxy": 190}


@contextlib.contextmanager
def time_limit(seconds: int | None):
    """Raise TimeoutError in this (main) thread after ``seconds``; None: no limit."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def isolated(name: str, check, limit_s: int | None = None) -> list[dict]:
    """The rows of ``check``, or one row with its error: a failing check, or one past ``limit_s`` seconds, never
    costs the table its other rows."""
    import traceback

    try:
        with time_limit(limit_s):
            return check()
    except Exception as exc:  # noqa: BLE001  (reported in the table, and the exit status says so)
        traceback.print_exc()
        message = " ".join(str(exc).split())[:300]
        return [{"check": name, "result": f"FAILED: {type(exc).__name__}: {message}"}]


if __name__ == "__main__":
    main()
