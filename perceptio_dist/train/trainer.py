"""The trainer: builds model, objective and DeepSpeed engine from a config, then runs the loop.

It never branches on the model variant (everything model-specific lives in the config and in the
model's own code) nor on the parallel mode (parallel/strategy.py builds the engine and runs a step).
One optimizer step = ``grad_accum_steps`` micro-batches per data-parallel replica.

Fault tolerance (train/checkpoint.py, train/signals.py): checkpoints every N steps and/or minutes,
published only when complete; ``checkpoint.resume=auto`` continues from the newest intact one (on
another rank count through DeepSpeed's universal format); SIGUSR1/SIGTERM make every rank finish the
step, save together and exit with the requeue status; a non-finite loss skips the micro-batch on
every rank, and too many in a row stop the run with a diagnostic checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError, dump_yaml
from ..config.extensions import with_extension_defaults
from ..config.training import PerceptioConfig, config_from_dict, validate_runtime
from ..data.training_data import build_loader
from ..logging_setup import configure_logging
from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import TERMS, PerceptioObjective
from ..model.perceptio import build_perceptio, parameter_report
from ..model.tokenizer import load_tokenizer
from ..parallel.deepspeed_config import build_deepspeed_config
from ..parallel.distributed import DistInfo, all_reduce_sum, any_rank, barrier, init_distributed
from ..parallel.strategy import build_strategy
from ..parallel.zero import inject_optimizer_step
from .checkpoint import CheckpointManager, Resumable, rng_state, saved_config, saved_world_size, set_rng_state
from .flops import device_peak_tflops, flops_model_for
from .metrics import MetricsLogger, peak_memory_mb
from .optim import build_optimizer
from .signals import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, REQUEUE_MARKER, StopRequest

log = logging.getLogger("perceptio_dist.train")
# Model fields that may differ between a checkpoint and the run resuming it: where weights came from.
RESUMABLE_MODEL_DIFFERENCES = {"pretrained_path", "tokenizer", "sam2_checkpoint", "checkpoint", "attn_implementation"}


class TrainingStopped(SystemExit):
    """Raised on every rank after a coordinated stop (signal or non-finite losses), carrying the exit status."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def saved_model_fields(saved: dict) -> dict:
    """A checkpoint's model config with fields added to the stack since it was saved at their defaults (what the
    checkpoint was trained with), so an upgrade does not refuse it; a field the recipe sets otherwise still does."""
    try:
        return with_extension_defaults(config_from_dict(saved))["model"]
    except ConfigError:
        return saved["model"]


def _model_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_MODEL_DIFFERENCES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _model_differences(a, b, f"{prefix}.{key}")
        elif a != b:
            diffs.append(f"{prefix}.{key}: checkpoint {a!r}, recipe {b!r}")
    return diffs


class NonfiniteCounter:
    """The strategies' guard: counts non-finite losses; after ``train.max_nonfinite_in_a_row`` in a row it saves a
    diagnostic checkpoint and stops the run (exit status 3). ZeRO runs skip the micro-batch (no update applied);
    a pipeline learns of it after the update, so its diagnostic checkpoint holds the step after it."""

    def __init__(self, limit: int, save: Callable[[int, str], Path], skipped: int = 0):
        self.limit, self.save, self.skipped, self.in_a_row = limit, save, skipped, 0

    def finite(self) -> None:
        self.in_a_row = 0

    def nonfinite(self, step: int, update_applied: bool) -> None:
        self.in_a_row += 1
        self.skipped += 1
        what = "the update was applied" if update_applied else "micro-batch skipped on every rank"
        log.warning("non-finite loss at step %d (%s; %d in a row, %d in all)", step + 1, what, self.in_a_row,
                    self.skipped)
        if self.in_a_row >= self.limit:
            path = self.save(step + int(update_applied), f"diagnostic: {self.in_a_row} non-finite losses in a row")
            log.error("stopping: %d non-finite losses in a row; diagnostic checkpoint %s", self.in_a_row, path)
            raise TrainingStopped(NONFINITE_EXIT_CODE)


def use_deterministic_kernels() -> None:
    """torch's deterministic mode, set before CUDA starts: cuBLAS reads its workspace setting when it creates its
    first handle, and without it deterministic mode refuses cuBLAS matmuls."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


class Trainer:
    """``Trainer(cfg).train()``."""

    def __init__(self, cfg: PerceptioConfig):
        self.cfg = cfg
        # Paths and batch arithmetic first: a config mistake fails in a second, before any process group.
        validate_runtime(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.train.deterministic:
            use_deterministic_kernels()
        self.dist: DistInfo = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
        configure_logging(self.dist.rank)
        self.stop = StopRequest()
        self.save_seconds: list[dict] = []  # each checkpoint save: step, reason, wall seconds
        self.strategy = build_strategy(cfg, self.dist)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.run_dir = Path(cfg.logging.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        barrier()
        self.checkpoints = CheckpointManager(Path(cfg.checkpoint.dir or self.run_dir / "checkpoints"), self.dist,
                                             cfg.checkpoint.keep_last, cfg.checkpoint.verify_checksums)
        self.resume_from = self._find_resume()
        if self.resume_from is not None:
            self._check_resumable(self.resume_from)

        self.tokenizer = load_tokenizer(cfg.model.backbone)
        self.ds_config = build_deepspeed_config(cfg, self.dist.world_size)
        if self.resume_from is not None and saved_world_size(self.resume_from.path) != self.dist.world_size:
            self.resume_from = self.checkpoints.to_universal(self.resume_from)  # elastic (ZeRO only: checked above)
            self.ds_config["checkpoint"] = {"load_universal": True}
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        with self.strategy.model_construction(self.ds_config):
            model = build_perceptio(cfg.model, self.tokenizer, dtype, seed=cfg.train.seed)
        if cfg.train.activation_checkpointing:  # each decoder/vision layer recomputes itself (also in pipelines)
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # What the loop needs to know about the model, kept so a pipeline stage can drop the parts it does not run.
        self.param_report = parameter_report(model)
        self.flops = flops_model_for(model)
        self.attn_implementation = model.attn_implementation
        token_ids = model.token_ids

        objective = PerceptioObjective(cfg.objective, token_ids)
        lm_head_terms = LMHeadTermsModule.from_config(cfg.objective, self.dist.device, vocab_size=len(self.tokenizer))
        self.lm_head_implementation = lm_head_terms.implementation
        module = self.strategy.wrap(model, objective, lm_head_terms)
        del model  # a pipeline stage keeps only its own layers
        optimizer, scheduler = build_optimizer(module, cfg.train)
        self.engine, self.scheduler = self.strategy.initialize(module, optimizer, scheduler, self.ds_config)
        # Data-parallel replicas read different samples; the stages of one replica read the same ones.
        self.loader = build_loader(cfg, self.tokenizer, token_ids, self.strategy.data_rank, self.strategy.data_ranks)
        self.stage_layout = self.strategy.layout()
        self.start_step = 0
        self.nonfinite = NonfiniteCounter(cfg.train.max_nonfinite_in_a_row, self._save)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.dist.is_main:  # only now: a refused resume leaves the run folder as it was
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        # A rank that reads no batches (a pipeline's middle stage) never starts the loader's workers.
        self.batches = iter(self.loader) if self.strategy.reads_batches else iter(())
        self._log_setup()

    # -------------------------------------------------------------------------------- resume

    def _find_resume(self) -> Resumable | None:
        setting = self.cfg.checkpoint.resume
        if setting == "none":
            return None
        if setting == "auto":
            found = self.checkpoints.find_resumable()
            if found is None:
                log.info("no complete checkpoint in %s: starting fresh", self.checkpoints.folder)
            return found
        return self.checkpoints.explicit(setting)

    def _check_resumable(self, found: Resumable) -> None:
        """Refuse, before building anything, a checkpoint of another model or of a layout this run cannot load."""
        saved = saved_config(found.path)
        diffs = _model_differences(saved_model_fields(saved), with_extension_defaults(self.cfg)["model"])
        if diffs:
            raise ConfigError(f"Config error at 'checkpoint.resume': {found.path.name} holds a different model "
                              f"({'; '.join(diffs[:5])}). Resume with the recipe it was trained with.")
        diffs = self.strategy.resume_differences(saved.get("parallel", {}), saved_world_size(found.path))
        if diffs:
            raise ConfigError(f"Config error at 'checkpoint.resume': {found.path.name} was saved with another parallel "
                              f"layout ({'; '.join(diffs)}). Pipeline checkpoints resume only with the layout and rank "
                              "count they were saved with; resume with those settings (or export the checkpoint "
                              "with perceptio-export, which works for any layout).")

    def _resume(self, found: Resumable) -> None:
        client, rank_state = self.checkpoints.load(self.engine, found)
        self.start_step = int(client["step"])
        self.nonfinite.skipped = int(client.get("nonfinite_skipped", 0))
        if self.ds_config.get("checkpoint", {}).get("load_universal"):
            injected = inject_optimizer_step(self.engine, self.start_step)
            log.info("universal checkpoint: Adam step %d set in %d optimizer states (one tensor each)", self.start_step,
                     injected)
        # Same layout: this rank's own loader and RNG states. Elastic: rank 0's loader state, re-split.
        self.loader.load_state_dict((rank_state or {}).get("loader") or client["loader"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        log.info("resumed from %s at step %d (loader position %d)", found.path, self.start_step, self.loader.position)

    # ---------------------------------------------------------------------------------- save

    def _save(self, step: int, reason: str) -> Path:
        client = {"step": step, "nonfinite_skipped": self.nonfinite.skipped, "config": self.cfg.to_dict(),
                  "config_hash": self.cfg.hash(), "loader": self.loader.state_dict(), "versions": _versions()}
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        start = time.perf_counter()
        path = self.checkpoints.save(self.engine, step, client, rank_state, reason, dump_yaml(self.cfg))
        self.save_seconds.append({"step": step, "reason": reason, "seconds": time.perf_counter() - start})
        log.info("checkpoint at step %d took %.2f s", step, self.save_seconds[-1]["seconds"])
        return path

    def _log_setup(self) -> None:
        cfg = self.cfg
        log.info("attention implementation: %s", self.attn_implementation)
        log.info("LM-head loss implementation: %s", self.lm_head_implementation)
        log.info(
            "ranks: %d (%s), %sZeRO stage %d, precision %s, micro-batch %d x accum %d -> global batch %d",
            self.dist.world_size, self.dist.device.type, self.strategy.describe(), cfg.parallel.zero_stage,
            cfg.train.precision,
            cfg.train.micro_batch_size, cfg.train.grad_accum_steps, self.ds_config["train_batch_size"],
        )
        for name, count in self.param_report.items():
            log.info("parameters %-28s %15s", name, f"{count:,}")
        for stage in self.stage_layout or []:
            kinds = stage["kinds"]
            log.info("pipeline stage %d: layers %d-%d (%s ... %s), %s parameters", stage["stage"], *stage["layers"],
                     kinds[0], kinds[-1], f"{stage['parameters']:,}")

    # ---------------------------------------------------------------------------------- loop

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, t, engine, device = self.cfg, self.cfg.train, self.engine, self.dist.device
        flops = self.flops
        peak, peak_source = device_peak_tflops(device, cfg.logging.peak_tflops_per_device)
        log.info("MFU peak per device: %.3f TFLOP/s (%s)", peak, peak_source)
        metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.to_dict(), enabled=self.dist.is_main)
        samples_sink = None
        if cfg.logging.log_samples:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            # Line-buffered: a rank killed mid-run loses no line.
            samples_sink = open(self.run_dir / "samples" / f"rank{self.dist.rank}.jsonl", "a", buffering=1)
        bar = tqdm(total=t.max_steps, initial=self.start_step, desc="train", unit="step",
                   disable=not (self.dist.is_main and cfg.logging.progress_bar), dynamic_ncols=True)
        history: list[dict] = []
        wall_start = last_save = time.perf_counter()
        engine.train()
        try:
            for step in range(self.start_step, t.max_steps):
                record = self._step(step, flops, peak, samples_sink)
                history.append({"step": step + 1, **record})
                if (step + 1) % cfg.logging.log_every_steps == 0 or step + 1 == t.max_steps:
                    metrics.log(step + 1, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if step + 1 == t.max_steps:
                    break
                if any_rank(self.stop.requested, device):
                    self._save(step + 1, f"signal {self.stop.signal_name or 'on another rank'}")
                    self._requeue_exit(step + 1)
                every, minutes = cfg.checkpoint.save_every_steps, cfg.checkpoint.save_every_minutes
                due = minutes > 0 and any_rank(time.perf_counter() - last_save >= 60 * minutes, device)
                if (every and (step + 1) % every == 0) or due:
                    self._save(step + 1, "periodic")
                    last_save = time.perf_counter()
        finally:
            bar.close()
            if samples_sink is not None:
                samples_sink.close()
        if cfg.checkpoint.save_final and t.max_steps > self.start_step:
            self._save(t.max_steps, "final")
        summary = self._summary(history, time.perf_counter() - wall_start)
        metrics.close()
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(self._summary_text(summary, history), flush=True)
        return summary

    def _step(self, step: int, flops, peak: float, samples_sink) -> dict:
        device = self.dist.device
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        term_sums = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        term_counts = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        work = torch.zeros(4, dtype=torch.float64, device=device)  # real tokens, samples, model FLOPs, positions

        def count_work(batch) -> torch.Tensor:
            # Real tokens per sample (packed or padded), so padding never counts as work.
            lengths = batch.sample_lengths
            model_flops = flops.step_flops(lengths, batch.pixel_values.shape[0], target_rows=batch.num_targets)
            return torch.tensor([sum(lengths), batch.num_samples, model_flops, batch.input_ids.numel()],
                                dtype=torch.float64, device=device)

        def on_batch(batch, micro: int) -> None:
            if samples_sink is not None:
                samples_sink.write(json.dumps({"step": step + 1, "micro": micro, "keys": list(batch.keys)}) + "\n")

        result = self.strategy.step(self.batches, on_batch, self.nonfinite, step)
        # Records and batches cover each sample once over all ranks (pipelines: the last stage's only). Each record
        # holds its micro-batch's share of every step term (its sum over the step's count), so the sums over
        # micro-batches and ranks are the step's per-item means: exactly the terms the update optimised.
        for terms, counts in result.records:
            term_sums += terms.double()
            term_counts += counts.double()
        for batch in result.batches:
            work += count_work(batch)
        term_sums, term_counts = all_reduce_sum(torch.stack([term_sums, term_counts])).unbind(0)
        term_means = term_sums.tolist()
        tokens, samples, step_flops, positions = all_reduce_sum(work).tolist()
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": result.loss,
            **{f"loss/{name}": (value if n > 0 else None) for name, value, n in zip(TERMS, term_means,
                                                                                     term_counts.tolist())},
            **{f"items/{name}": value for name, value in zip(TERMS, result.item_counts)},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": int(tokens),
            "samples": int(samples),
            "padding_fraction": 1.0 - tokens / positions if positions else 0.0,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "mfu": step_flops / elapsed / (peak * 1e12 * self.dist.world_size),
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(device),
            "data/skipped_samples": self.loader.skipped,
            "nonfinite_skipped": self.nonfinite.skipped,
        }

    def _requeue_exit(self, step: int) -> None:
        """After a signal-triggered save: mark the run for requeue and stop every rank."""
        if self.dist.is_main:
            (self.run_dir / REQUEUE_MARKER).write_text(json.dumps({"step": step, "signal": self.stop.signal_name}))
        barrier()
        log.warning("stopped by %s at step %d: checkpoint saved, exiting for requeue", self.stop.signal_name, step)
        # Under torchrun a non-zero status reads as a crash; the perceptio-train launcher maps the marker instead.
        raise TrainingStopped(0 if os.environ.get("TORCHELASTIC_RUN_ID") else REQUEUE_EXIT_CODE)

    def _summary_text(self, summary: dict, history: list[dict]) -> str:
        """The end-of-run summary a person reads: each term at the first and last step it was scored."""
        lines = [f"\n== {summary['steps']} steps on {summary['world_size']} rank(s) in {summary['wall_time_s']:.1f}s "
                 f"({history[-1]['tokens_per_s']:.0f} tokens/s at the end) ==" if history else
                 f"== nothing to do: the run already reached train.max_steps={self.cfg.train.max_steps} =="]
        for key in ["loss"] + [f"loss/{name}" for name in TERMS]:
            values = [h[key] for h in history if h.get(key) is not None]
            if values:
                lines.append(f"  {key:22s} {values[0]:9.4f} -> {values[-1]:9.4f}")
        lines.append(f"  run folder: {self.run_dir} (metrics.jsonl, summary.json, config.yaml, checkpoints/)")
        return "\n".join(lines)

    def _summary(self, history: list[dict], wall: float) -> dict:
        if not history:
            return {"steps": 0, "wall_time_s": wall, "first_loss": float("nan"), "last_loss": float("nan"),
                    "world_size": self.dist.world_size, "losses": []}
        k = max(1, len(history) // 5)
        return {
            "steps": len(history),
            "first_step": history[0]["step"],
            "wall_time_s": wall,
            "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"],
            "mean_loss_first_fifth": float(np.mean([h["loss"] for h in history[:k]])),
            "mean_loss_last_fifth": float(np.mean([h["loss"] for h in history[-k:]])),
            "attn_implementation": self.attn_implementation,
            "parameters": self.param_report,
            "world_size": self.dist.world_size,
            "pipeline_stages": self.stage_layout,
            "nonfinite_skipped": self.nonfinite.skipped,
            "checkpoint_saves": self.save_seconds,  # wall time of each save (all ranks, barrier included)
            "losses": [h["loss"] for h in history],
        }


def _versions() -> dict:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
