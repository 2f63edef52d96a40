"""Console entry points. A config mistake prints one paragraph and exits with status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, PerceptioConfig, dump_yaml, iter_field_docs, load_config, recipe_names

CONFIG_ERROR_EXIT = 2


def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--recipe", default="tiny_cpu",
                        help=f"a shipped recipe ({', '.join(recipe_names())}) or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. train.lr=1e-4 train.max_steps=10")
    return parser


def _load_or_exit(recipe: str, overrides: list[str]) -> PerceptioConfig:
    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        _config_error_exit(exc)


def _config_error_exit(exc: ConfigError) -> None:
    # Under torchrun every rank fails the same way; one message is enough.
    if os.environ.get("RANK", "0") == "0":
        print(str(exc), file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_EXIT)


def train_main(argv: list[str] | None = None) -> None:
    """perceptio-train [--nproc-per-node N] [--resume auto|PATH] --recipe R [overrides]: validate, then train.

    With --nproc-per-node it launches torchrun, forwards SIGUSR1/SIGTERM to the ranks, and exits with
    the requeue status (75) when the ranks stopped for a signal after saving a checkpoint."""
    parser = _recipe_parser("perceptio-train", "Train a Perceptio model with DeepSpeed.")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="launch this many local ranks with torchrun (omit when already under torchrun/srun)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="nodes taking part (one perceptio-train per node, e.g. under srun); needs --rdzv-endpoint")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="c10d rendezvous on the first node (multi-node runs)")
    parser.add_argument("--rdzv-id", default="perceptio", help="rendezvous id shared by the nodes of one run")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest complete checkpoint (auto) or from PATH")
    args = parser.parse_args(argv)
    if args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = _load_or_exit(args.recipe, overrides)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        from .config import validate_runtime

        try:  # a rank-count mistake (batch arithmetic, pipeline stages) stops here, not in every rank
            validate_runtime(cfg, args.nproc_per_node * args.nnodes)
        except ConfigError as exc:
            _config_error_exit(exc)
        if args.rdzv_endpoint:
            rendezvous = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                          f"--rdzv-id={args.rdzv_id}"]
        else:
            rendezvous = ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
               f"--nproc_per_node={args.nproc_per_node}", "-m", "perceptio_dist.train",
               "--recipe", args.recipe, *overrides]
        raise SystemExit(launch_ranks(cmd, Path(cfg.logging.output_dir)))
    from .train.trainer import Trainer

    try:
        Trainer(cfg).train()
    except ConfigError as exc:  # errors only visible at run time (paths, rank count, checkpoint)
        _config_error_exit(exc)


def launch_ranks(cmd: list[str], run_dir: Path) -> int:
    """Run torchrun, forwarding preemption signals to the rank processes; map a requeue stop to its status."""
    import signal
    import subprocess

    import psutil

    from .train.signals import REQUEUE_EXIT_CODE, REQUEUE_MARKER

    (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
    # SLURM signals every process of a job step, torchrun's agent included, whose default action on
    # SIGUSR1 is to die and take the ranks down unsaved. The agent is started with SIGUSR1 ignored (an
    # ignored disposition survives exec); the ranks install their own handler (train/signals.py).
    proc = subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))

    def forward(signum, _frame):
        # To the ranks (torchrun's direct children): not to torchrun's agent, whose default action on SIGUSR1
        # would kill them unsaved, nor to their data-loader workers.
        for child in psutil.Process(proc.pid).children():
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    code = proc.wait()
    if (run_dir / REQUEUE_MARKER).exists():
        return REQUEUE_EXIT_CODE
    return code


def model_info_main(argv: list[str] | None = None) -> None:
    """perceptio-model-info --recipe R: build the model on the meta device and print parameter counts."""
    parser = _recipe_parser("perceptio-model-info", "Parameter counts of a recipe's model (meta device, no weights).")
    args = parser.parse_args(argv)
    cfg = _load_or_exit(args.recipe, args.overrides)
    from .model.perceptio import build_perceptio_meta, parameter_report

    try:
        report = parameter_report(build_perceptio_meta(cfg.model))
    except ConfigError as exc:
        _config_error_exit(exc)
    for name, count in report.items():
        print(f"{name:30s} {count:>16,}  ({count / 1e9:.3f} B)")


def config_main(argv: list[str] | None = None) -> None:
    """perceptio-config --recipe R [--explain] [overrides]: print the resolved config or every field's documentation."""
    parser = _recipe_parser("perceptio-config", "Show a resolved recipe, or document every config field.")
    parser.add_argument("--explain", action="store_true", help="list every field with its type, default and meaning")
    args = parser.parse_args(argv)
    if args.explain:
        for name, type_name, default, doc in iter_field_docs():
            print(f"{name} ({type_name}, default {default!r})\n    {doc}")
        return
    print(dump_yaml(_load_or_exit(args.recipe, args.overrides)), end="")


def vqvae_main(argv: list[str] | None = None) -> None:
    """perceptio-vqvae train|eval|ablate: the depth tokenizer (train it, report its quality, compare K and grids)."""
    parser = argparse.ArgumentParser(prog="perceptio-vqvae", description="Train and evaluate the depth tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer (run under torchrun for several ranks)")
    train.add_argument("--config", default="vqvae_tiny", help="a recipe in recipes/vqvae/ or a yaml path")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = sub.add_parser("eval", help="report reconstruction quality on real RGB-D frames")
    evaluate.add_argument("--tokenizer", required=True, help="folder with tokenizer.safetensors + tokenizer.json")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--rgbd", default=None, help="folder of the shared RGB-D frames (default ../shared/data/rgbd)")
    evaluate.add_argument("--sets", type=int, default=500, help="point sets per size and frame")
    ablate = sub.add_parser("ablate", help="train variants of a recipe (K, grid) and report them side by side")
    ablate.add_argument("--config", default="vqvae_report")
    ablate.add_argument("--codes", type=int, nargs="+", default=[64, 128, 256])
    ablate.add_argument("--grids", type=int, nargs="+", default=[8, 10, 16])
    ablate.add_argument("--out", required=True)
    ablate.add_argument("--sets", type=int, default=500)
    ablate.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from .depth_tokenizer import ablate_tokenizers, evaluate_tokenizer, train_tokenizer

    try:
        if args.command == "train":
            train_tokenizer(args.config, args.overrides)
        elif args.command == "eval":
            print(evaluate_tokenizer(args.tokenizer, args.out, args.rgbd, args.sets))
        else:
            print(ablate_tokenizers(args.config, args.overrides, args.codes, args.grids, args.out, args.sets))
    except ConfigError as exc:
        _config_error_exit(exc)


def export_main(argv: list[str] | None = None) -> None:
    """perceptio-export --checkpoint DIR --out DIR: a checkpoint as an inference folder (safetensors, tokenizer, config)."""
    parser = argparse.ArgumentParser(prog="perceptio-export", description="Export a training checkpoint for inference.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. runs/x/checkpoints/global_step00000040")
    parser.add_argument("--out", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    from .export import export_checkpoint

    try:
        print(export_checkpoint(args.checkpoint, args.out))
    except ConfigError as exc:
        _config_error_exit(exc)
