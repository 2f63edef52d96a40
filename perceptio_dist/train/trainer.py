"""The trainer: builds model, objective and DeepSpeed engine from a config, then runs the loop.

It never branches on the model variant; everything model-specific lives in the config and in
the model's own code. One optimizer step = ``grad_accum_steps`` micro-batches per rank.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..config import PerceptioConfig, dump_yaml, validate_runtime
from ..data.training_data import build_loader
from ..losses.objective import TERMS, PerceptioObjective
from ..model.perceptio import build_perceptio, parameter_report
from ..model.tokenizer import load_tokenizer
from ..parallel.deepspeed_config import build_deepspeed_config
from ..parallel.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from ..parallel.zero import partitioned_construction, register_external_parameters
from .flops import device_peak_tflops, flops_model_for
from .metrics import MetricsLogger, peak_memory_mb
from .module import PerceptioTrainingModule
from .optim import build_optimizer

log = logging.getLogger("perceptio_dist.train")


def configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(cfg).train()``."""

    def __init__(self, cfg: PerceptioConfig):
        import deepspeed

        self.cfg = cfg
        # Paths and batch arithmetic first: a config mistake fails in a second, before any process group.
        validate_runtime(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.dist: DistInfo = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
        configure_logging(self.dist.rank)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.run_dir = Path(cfg.logging.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        barrier()

        self.tokenizer = load_tokenizer(cfg.model.backbone)
        self.ds_config = build_deepspeed_config(cfg, self.dist.world_size)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        zero3 = cfg.parallel.zero_stage == 3
        with partitioned_construction(self.ds_config, enabled=zero3 and cfg.parallel.zero_init):
            self.model = build_perceptio(cfg.model, self.tokenizer, dtype)
        if cfg.train.activation_checkpointing:
            self.model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.param_report = parameter_report(self.model)

        objective = PerceptioObjective(cfg.objective, self.model.token_ids)
        module = PerceptioTrainingModule(self.model, objective, cfg.objective.implementation,
                                         cfg.objective.chunk_size, self.dist.device)
        if zero3:
            register_external_parameters(module.external_parameters())
        optimizer, scheduler = build_optimizer(module, cfg.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.start_step = 0
        self.loader = build_loader(
            cfg, self.tokenizer, self.model.token_ids, self.model.seg_head.image_size,
            self.model.backbone.config.image_seq_length, self.dist.rank, self.dist.world_size,
        )
        self.batches = iter(self.loader)
        self._log_setup()

    def _log_setup(self) -> None:
        cfg = self.cfg
        log.info("attention implementation: %s", self.model.attn_implementation)
        log.info("LM-head loss implementation: %s", self.engine.module.lm_head_terms.implementation)
        log.info(
            "ranks: %d (%s), ZeRO stage %d, precision %s, micro-batch %d x accum %d -> global batch %d",
            self.dist.world_size, self.dist.device.type, cfg.parallel.zero_stage, cfg.train.precision,
            cfg.train.micro_batch_size, cfg.train.grad_accum_steps, self.ds_config["train_batch_size"],
        )
        for name, count in self.param_report.items():
            log.info("parameters %-28s %15s", name, f"{count:,}")

    def _save_checkpoint(self, step: int) -> None:
        ckpt_dir = Path(self.cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.engine.save_checkpoint(
            str(ckpt_dir), tag=f"global_step{step}", client_state={"step": step, "config_hash": self.cfg.hash()}
        )
        log.info("saved checkpoint global_step%d in %s", step, ckpt_dir)

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, t, engine, device = self.cfg, self.cfg.train, self.engine, self.dist.device
        flops = flops_model_for(self.model)
        peak, peak_source = device_peak_tflops(device, cfg.logging.peak_tflops_per_device)
        log.info("MFU peak per device: %.3f TFLOP/s (%s)", peak, peak_source)
        metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.to_dict(), enabled=self.dist.is_main)
        bar = tqdm(total=t.max_steps, initial=self.start_step, desc="train", unit="step",
                   disable=not (self.dist.is_main and cfg.logging.progress_bar), dynamic_ncols=True)
        history: list[dict] = []
        wall_start = time.perf_counter()
        engine.train()
        for step in range(self.start_step, t.max_steps):
            start = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            loss_sum = torch.zeros(1, device=device)
            weighted_terms = torch.zeros(len(TERMS), device=device)
            term_counts = torch.zeros(len(TERMS), device=device)
            work = torch.zeros(3, dtype=torch.float64, device=device)  # tokens, samples, model FLOPs
            for _ in range(t.grad_accum_steps):
                batch = next(self.batches).to(device)
                loss, terms, counts = engine(**batch.as_dict())
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                weighted_terms += terms * counts
                term_counts += counts
                lengths = batch.attention_mask.sum(1).tolist()
                work += torch.tensor(
                    [sum(lengths), batch.num_samples, flops.step_flops(lengths, batch.pixel_values.shape[0])],
                    dtype=torch.float64, device=device,
                )
            mean_loss = all_reduce_mean(loss_sum / t.grad_accum_steps).item()
            # Terms are logged as means over every scored item of the global batch (not means of rank means).
            weighted_terms, term_counts = all_reduce_sum(torch.stack([weighted_terms, term_counts])).unbind(0)
            term_means = (weighted_terms / term_counts.clamp_min(1)).tolist()
            tokens, samples, step_flops = all_reduce_sum(work).tolist()
            elapsed = time.perf_counter() - start
            grad_norm = engine.get_global_grad_norm()
            record = {
                "loss": mean_loss,
                **{f"loss/{name}": (value if n > 0 else None)
                   for name, value, n in zip(TERMS, term_means, term_counts.tolist())},
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed,
                "mfu": step_flops / elapsed / (peak * 1e12 * self.dist.world_size),
                "step_time_s": elapsed,
                "peak_memory_mb": peak_memory_mb(device),
                "data/skipped_samples": self.loader.skipped,
            }
            history.append({"step": step + 1, **record})
            if (step + 1) % cfg.logging.log_every_steps == 0 or step + 1 == t.max_steps:
                metrics.log(step + 1, record)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            every = cfg.checkpoint.save_every_steps
            if every and (step + 1) % every == 0 and step + 1 != t.max_steps:
                self._save_checkpoint(step + 1)
        bar.close()
        if cfg.checkpoint.save_final:
            self._save_checkpoint(t.max_steps)
        summary = self._summary(history, time.perf_counter() - wall_start)
        metrics.close()
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(self._summary_text(summary, history), flush=True)
        return summary

    def _summary_text(self, summary: dict, history: list[dict]) -> str:
        """The end-of-run summary a person reads: each term at the first and last step it was scored."""
        lines = [f"\n== {summary['steps']} steps on {summary['world_size']} rank(s) in {summary['wall_time_s']:.1f}s "
                 f"({history[-1]['tokens_per_s']:.0f} tokens/s at the end) ==" if history else "== no steps =="]
        for key in ["loss"] + [f"loss/{name}" for name in TERMS]:
            values = [h[key] for h in history if h.get(key) is not None]
            if values:
                lines.append(f"  {key:22s} {values[0]:9.4f} -> {values[-1]:9.4f}")
        lines.append(f"  run folder: {self.run_dir} (metrics.jsonl, summary.json, config.yaml, checkpoints/)")
        return "\n".join(lines)

    def _summary(self, history: list[dict], wall: float) -> dict:
        if not history:
            return {"steps": 0, "wall_time_s": wall, "first_loss": float("nan"), "last_loss": float("nan")}
        k = max(1, len(history) // 5)
        return {
            "steps": len(history),
            "wall_time_s": wall,
            "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"],
            "mean_loss_first_fifth": float(np.mean([h["loss"] for h in history[:k]])),
            "mean_loss_last_fifth": float(np.mean([h["loss"] for h in history[-k:]])),
            "attn_implementation": self.model.attn_implementation,
            "parameters": self.param_report,
            "world_size": self.dist.world_size,
            "losses": [h["loss"] for h in history],
        }
