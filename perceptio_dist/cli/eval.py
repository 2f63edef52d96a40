"""perceptio-eval: score a model on the benchmarks (``torchrun --nproc_per_node N -m perceptio_dist.cli.eval ...``
splits the items over ranks; the results do not depend on the rank count)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..eval.benchmarks import DEFAULT_HARDBLINK
from ..eval.run import EXIT_USAGE, EvalRequest, run_evaluation
from ..logging_setup import configure_logging
from ..train.checkpoint import is_complete, newest_complete


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceptio-eval", description="Score an exported model (or a checkpoint) on the benchmarks, over one or several ranks.")
    parser.add_argument("--model", required=True,
                        help="an exported folder (perceptio-export), a training checkpoint folder (global_stepN), or a run's "
                             "checkpoints folder (its newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--benchmark", nargs="+", default=[], choices=["hardblink"],
                        help="benchmarks by name, with their default data (hardblink: ../shared/data/hardblink)")
    parser.add_argument("--hardblink", help="HardBLINK folder (questions/, answers/, images/)")
    parser.add_argument("--synthetic-scenes", help="a folder of rendered scenes with seeds not used in training")
    parser.add_argument("--refcoco", help="refer data root (refcoco/, refcoco+/, refcocog/, images/)")
    parser.add_argument("--refcoco-dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog"])
    parser.add_argument("--refcoco-split-by", default="unc")
    parser.add_argument("--refcoco-splits", nargs="+", default=["val", "testA", "testB"])
    parser.add_argument("--refcoco-images", default=None)
    parser.add_argument("--mmbench", help="an MMBench-style TSV with base64 images")
    parser.add_argument("--mmbench-circular", action="store_true",
                        help="VLMEvalKit's CircularEval: every question once per rotation of its options, right only "
                             "if right every time (reported beside the single pass, rotation 0)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per group")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--depth-policy", default="auto", choices=["auto", "force", "forbid", "free"],
                        help="auto: force the depth block when the model was trained with depth tokens")
    parser.add_argument("--max-new-tokens", type=int, default=160,
                        help="text tokens per answer; the spatial tokens the chain needs ([SEG], N + 2) come on top")
    parser.add_argument("--no-interventions", dest="interventions", action="store_false",
                        help="skip the depth interventions (answers again after ground-truth, random, constant "
                             "and another image's codes)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: each rank's own GPU (cuda:LOCAL_RANK) when there is one, else the CPU")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 on a GPU, fp32 on the CPU")
    args = parser.parse_args(argv)
    configure_logging(int(os.environ.get("RANK", "0")))
    if "hardblink" in args.benchmark and not args.hardblink:
        args.hardblink = str(DEFAULT_HARDBLINK)
    if not any([args.hardblink, args.synthetic_scenes, args.refcoco, args.mmbench]):
        parser.error("name at least one benchmark: --benchmark hardblink, --hardblink, --synthetic-scenes, "
                     "--refcoco or --mmbench")
    args.model = str(newest_complete(args.model))  # a run's checkpoints/ folder: its newest complete checkpoint
    if not is_complete(args.model) and not (Path(args.model) / "perceptio.yaml").exists():
        print(f"perceptio-eval: {args.model} is not an exported model folder (no perceptio.yaml) nor a complete "
              "training checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    for flag in ("hardblink", "synthetic_scenes", "refcoco", "mmbench"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            print(f"perceptio-eval: --{flag.replace('_', '-')} {value} does not exist", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("perceptio-eval: --device cuda, but torch sees no GPU here (use --device auto or cpu)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest)}
    run_evaluation(EvalRequest(**{**options, "refcoco_splits": tuple(args.refcoco_splits)}))


if __name__ == "__main__":
    main()
