"""Peak memory and time of the LM-head loss path, forward + backward: fused vs reference, in one run.

    python tools/bench_fused_loss.py                              # 8192 tokens, hidden 4096, vocab 151,936 + spatial, fp32, CPU
    python tools/bench_fused_loss.py --tokens 2048 --hidden 1024  # a quicker shape
    python tools/bench_fused_loss.py --device cuda --dtype bf16   # on a GPU (fused_triton joins; Liger too if installed)
    python tools/bench_fused_loss.py --device cuda --dtype bf16 --impls reference fused_triton cce   # any subset

Every implementation runs in a fresh subprocess on the same inputs (seeded), so peak memory is its own:
CPU peak RSS (ru_maxrss) or CUDA max_memory_allocated, minus what is resident once the inputs exist.
"Loss-path memory" further subtracts the gradient buffers of the inputs (dL/dW is V x d, dL/dH is
tokens x d): every implementation must produce those. The targets look like Perceptio batches: 40% of
the rows are depth-code rows in blocks of N=100 (with their markers), the rest answer text. The
reference is the baseline measured in the same run; ratios are fused / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K, N = 128, 100


def _targets(tokens: int, vocab: int):
    import torch

    from perceptio_dist.model.spatial_tokens import SpatialTokenIds

    base = vocab
    ids = SpatialTokenIds(seg=base, depth_start=base + 1, depth_end=base + 2, code_start=base + 3, num_codes=K,
                          num_depth_tokens=N)
    g = torch.Generator().manual_seed(0)
    seq: list[int] = []
    while len(seq) + N + 3 + 60 <= int(tokens * 0.45) + 160:
        seq += torch.randint(0, base, (57,), generator=g).tolist()
        seq += [ids.seg, ids.depth_start] + (ids.code_start + torch.randint(0, K, (N,), generator=g)).tolist()
        seq += [ids.depth_end]
    seq += torch.randint(0, base, (tokens - len(seq),), generator=g).tolist()
    return torch.tensor(seq[:tokens]), ids


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch

    from perceptio_dist.losses.layout import build_layout
    from perceptio_dist.losses.lm_head_terms import LMHeadWeights, lm_head_terms_fn

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    targets, ids = _targets(args.tokens, args.vocab)
    vocab = args.vocab + 3 + K
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
    layout = build_layout(targets.to(device), ids)
    weights = LMHeadWeights(1.0, 1.0, 1.0, 1e-4)
    if args.impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def run():
            return liger_fused_linear_cross_entropy(hidden, weight, targets.to(device))
    elif args.impl == "cce":  # Apple's Cut Cross-Entropy (pip install cut-cross-entropy), where installed
        from cut_cross_entropy import linear_cross_entropy

        def run():
            return linear_cross_entropy(hidden, weight, targets.to(device))
    else:
        fn = lm_head_terms_fn(args.impl, args.chunk)

        def run():
            out = fn(hidden, weight, layout, weights, ids.code_start, ids.num_codes)
            token = (torch.logsumexp(out.code_logits, -1)).mean()  # the code logits feed the token term
            return out.total + token

    def once():
        hidden.grad = weight.grad = None
        loss = run()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    for _ in range(args.warmup):  # Triton compiles its kernels on the first call: not part of the timing
        once()
    hidden.grad = weight.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = once()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = statistics.median(times)
    grads = (hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()) / 2**20
    return {"impl": args.impl, "seconds": round(seconds, 4), "repeats": args.repeats,
            "seconds_each": [round(t, 4) for t in times], "peak_above_inputs_mb": round(peak - base, 1),
            "loss_path_mb": round(peak - base - grads, 1), "input_grads_mb": round(grads, 1),
            "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936, help="base vocabulary, before the 131 spatial tokens")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (Triton compiles on the first); default 1 on cuda, 0 on cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs, the median reported; default 5 on cuda, 1 on cpu (a CPU run takes minutes)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.warmup = (1 if on_gpu else 0) if args.warmup is None else args.warmup
    args.repeats = (5 if on_gpu else 1) if args.repeats is None else max(1, args.repeats)
    if args.child:
        args.impl = args.child
        print(json.dumps(child(args)))
        return
    impls = args.impls or (["reference", "fused_torch"] + (["fused_triton"] if args.device == "cuda" else []))
    if args.device == "cuda" and args.impls is None:
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger")
        except ImportError:
            pass
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--child", impl, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--dtype", args.dtype, "--device", args.device,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            if proc.returncode == -9:
                reason = "killed (SIGKILL): out of memory on this machine"
            results[impl] = {"error": reason, "returncode": proc.returncode}
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results.get("reference", {})
    for impl, r in results.items():
        if impl != "reference" and "seconds" in r and "seconds" in ref:
            r["time_ratio_vs_reference"] = round(r["seconds"] / ref["seconds"], 3)
            r["loss_path_memory_ratio_vs_reference"] = round(r["loss_path_mb"] / ref["loss_path_mb"], 4)
            r["peak_memory_ratio_vs_reference"] = round(r["peak_above_inputs_mb"] / ref["peak_above_inputs_mb"], 4)
    shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab + 3 + K, "dtype": args.dtype,
             "device": args.device, "chunk": args.chunk}
    print(json.dumps({"shape": shape, "results": results}, indent=2))


if __name__ == "__main__":
    main()
