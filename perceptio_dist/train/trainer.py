"""The trainer: builds model, objective and DeepSpeed engine from a config, then runs the loop.

It never branches on the model variant; everything model-specific lives in the config and in
the model's own code. One optimizer step = ``grad_accum_steps`` micro-batches per rank.

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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, PerceptioConfig, dump_yaml, expand_path, resolve_path, validate_runtime
from ..data.training_data import build_loader
from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import TERMS, PerceptioObjective
from ..model.perceptio import build_perceptio, parameter_report
from ..model.tokenizer import load_tokenizer
from ..parallel.deepspeed_config import build_deepspeed_config
from ..parallel.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from ..parallel.pipeline import build_pipeline_module, layer_kinds, pipeline_batches, stage_of
from ..parallel.zero import inject_optimizer_step, partitioned_construction, register_external_parameters
from .checkpoint import CheckpointManager, Resumable, rng_state, set_rng_state
from .flops import device_peak_tflops, flops_model_for
from .metrics import MetricsLogger, peak_memory_mb
from .module import PerceptioTrainingModule
from .optim import build_optimizer
from .signals import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, REQUEUE_MARKER, StopRequest

log = logging.getLogger("perceptio_dist.train")
# Model fields that may differ between a checkpoint and the run resuming it: where weights came from.
RESUMABLE_MODEL_DIFFERENCES = {"pretrained_path", "tokenizer", "sam2_checkpoint", "checkpoint", "attn_implementation"}


class TrainingStopped(SystemExit):
    """Raised on every rank after a coordinated stop (signal or non-finite losses), carrying the exit status."""


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


class Trainer:
    """``Trainer(cfg).train()``."""

    def __init__(self, cfg: PerceptioConfig):
        import deepspeed

        self.cfg = cfg
        # Paths and batch arithmetic first: a config mistake fails in a second, before any process group.
        validate_runtime(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.dist: DistInfo = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_minutes)
        configure_logging(self.dist.rank)
        self.stop = StopRequest()
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.run_dir = Path(cfg.logging.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        barrier()
        self.checkpoints = CheckpointManager(Path(cfg.checkpoint.dir or self.run_dir / "checkpoints"), self.dist,
                                             cfg.checkpoint.keep_last, cfg.checkpoint.verify_checksums)
        self.resume_from = self._find_resume()
        if self.resume_from is not None:
            self._check_resumable_model(self.resume_from)

        self.tokenizer = load_tokenizer(cfg.model.backbone)
        self.ds_config = build_deepspeed_config(cfg, self.dist.world_size)
        if self.resume_from is not None and self._saved_world_size(self.resume_from) != self.dist.world_size:
            # Universal checkpoints carry no per-rank files: the loader state comes from rank 0's client state.
            self.resume_from = self._to_universal(self.resume_from)
            self.ds_config["checkpoint"] = {"load_universal": True}
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.pipeline = cfg.parallel.mode == "pipeline"
        zero3 = cfg.parallel.zero_stage == 3
        with partitioned_construction(self.ds_config, enabled=zero3 and cfg.parallel.zero_init):
            model = build_perceptio(cfg.model, self.tokenizer, dtype, seed=cfg.train.seed)
        if cfg.train.activation_checkpointing:  # each decoder/vision layer recomputes itself (also in pipelines)
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # What the loop needs to know about the model, kept so a pipeline stage can drop the parts it does not run.
        self.param_report = parameter_report(model)
        self.flops = flops_model_for(model)
        self.attn_implementation = model.attn_implementation
        token_ids, sam_size, tile_tokens = model.token_ids, model.seg_head.image_size, model.backbone.config.image_seq_length

        objective = PerceptioObjective(cfg.objective, token_ids)
        lm_head_terms = LMHeadTermsModule(cfg.objective.implementation, cfg.objective.chunk_size, self.dist.device)
        self.lm_head_implementation = lm_head_terms.implementation
        self.stage_loss = None
        if self.pipeline:
            module, self.stage_loss = build_pipeline_module(cfg, model, objective, lm_head_terms, self.dist.world_size)
            self.stage, data_rank, data_ranks = stage_of(cfg, self.dist.rank, self.dist.world_size)
        else:
            module = PerceptioTrainingModule(model, objective, lm_head_terms)
            if zero3:
                register_external_parameters(module.external_parameters())
            self.stage, data_rank, data_ranks = 0, self.dist.rank, self.dist.world_size
        del model  # a pipeline stage keeps only its own layers
        optimizer, scheduler = build_optimizer(module, cfg.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        # Data-parallel replicas read different samples; the stages of one replica read the same ones.
        self.loader = build_loader(cfg, self.tokenizer, token_ids, sam_size, tile_tokens, data_rank, data_ranks)
        self.last_stage = self.stage == cfg.parallel.pp_stages - 1
        self.stage_layout = self._stage_layout(module, data_rank) if self.pipeline else None
        self.start_step, self.nonfinite_skipped, self.nonfinite_in_a_row = 0, 0, 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.batches = iter(self.loader)
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
        path = resolve_path(expand_path(setting, "checkpoint.resume"))
        problem = self.checkpoints.verify(path) if path.exists() else "it does not exist"
        if problem:
            raise ConfigError(f"Config error at 'checkpoint.resume': cannot resume from {setting}: {problem}.")
        self.checkpoints.folder = path.parent
        return Resumable(path, int(json.loads((path / "COMPLETE.json").read_text())["step"]))

    def _check_resumable_model(self, found: Resumable) -> None:
        """Refuse, before building anything, a checkpoint of a model the recipe does not describe."""
        import yaml

        saved = yaml.safe_load((found.path / "config.yaml").read_text())["model"]
        diffs = _model_differences(saved, self.cfg.to_dict()["model"])
        if diffs:
            raise ConfigError(f"Config error at 'checkpoint.resume': {found.path.name} holds a different model "
                              f"({'; '.join(diffs[:5])}). Resume with the recipe it was trained with.")
        self._check_resumable_layout(found)

    def _check_resumable_layout(self, found: Resumable) -> None:
        """A pipeline checkpoint (per-stage layer files, per-rank optimizer partitions) resumes only as it was saved."""
        import yaml

        saved = yaml.safe_load((found.path / "config.yaml").read_text()).get("parallel", {})
        current = self.cfg.to_dict()["parallel"]
        if saved.get("mode", "zero") != "pipeline" and current["mode"] != "pipeline":
            return  # ZeRO checkpoints resume on any rank count (universal format)
        defaults = {"mode": "zero", "pp_stages": 1, "pp_partition": "parameters", "pp_layers_per_stage": None}
        diffs = [f"parallel.{k}: checkpoint {saved.get(k, defaults.get(k))!r}, now {current[k]!r}"
                 for k in ("mode", "pp_stages", "pp_partition", "pp_layers_per_stage", "zero_stage")
                 if saved.get(k, defaults.get(k)) != current[k]]
        if self._saved_world_size(found) != self.dist.world_size:
            diffs.append(f"ranks: checkpoint {self._saved_world_size(found)}, now {self.dist.world_size}")
        if diffs:
            raise ConfigError(f"Config error at 'checkpoint.resume': {found.path.name} was saved with another parallel "
                              f"layout ({'; '.join(diffs)}). Pipeline checkpoints resume only with the layout and rank "
                              "count they were saved with; resume with those settings (or export the checkpoint "
                              "with perceptio-export, which works for any layout).")

    @staticmethod
    def _saved_world_size(found: Resumable) -> int:
        return int(json.loads((found.path / "COMPLETE.json").read_text())["world_size"])

    def _to_universal(self, found: Resumable) -> Resumable:
        """DeepSpeed's ds_to_universal (rank 0, once per checkpoint), so another rank count can load it."""
        out = found.path.parent / f"{found.path.name}_universal"
        if self.dist.is_main and not (out / "DONE").exists():
            log.info("rank count changed (%d -> %d): converting %s to the universal format",
                     self._saved_world_size(found), self.dist.world_size, found.path.name)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(found.path),
                   "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed:\n{proc.stderr[-3000:]}")
            (out / "DONE").write_text("")
        barrier()
        return Resumable(out, found.step)

    def _resume(self, found: Resumable) -> None:
        client, rank_state = self.checkpoints.load(self.engine, found)
        self.start_step = int(client["step"])
        self.nonfinite_skipped = int(client.get("nonfinite_skipped", 0))
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
        client = {"step": step, "nonfinite_skipped": self.nonfinite_skipped, "config": self.cfg.to_dict(),
                  "config_hash": self.cfg.hash(), "loader": self.loader.state_dict(), "versions": _versions()}
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        return self.checkpoints.save(self.engine, step, client, rank_state, reason, dump_yaml(self.cfg))

    def _stage_layout(self, module, data_rank: int) -> list[dict]:
        """Per stage: its layers (pipeline layer indices and kinds) and parameter count, agreed by every rank."""
        stages = self.cfg.parallel.pp_stages
        counts = torch.zeros(stages, dtype=torch.float64, device=self.dist.device)
        if data_rank == 0:
            counts[self.stage] = float(sum(p.numel() for p in module.parameters()))
        counts = all_reduce_sum(counts).tolist()
        kinds = layer_kinds(self.cfg.model.backbone.text.num_layers, bool(module.tied_modules))
        return [{"stage": s, "layers": [int(module.parts[s]), int(module.parts[s + 1]) - 1],
                 "kinds": kinds[module.parts[s]:module.parts[s + 1]], "parameters": int(counts[s])}
                for s in range(stages)]

    def _log_setup(self) -> None:
        cfg = self.cfg
        log.info("attention implementation: %s", self.attn_implementation)
        log.info("LM-head loss implementation: %s", self.lm_head_implementation)
        layout = (f"pipeline of {cfg.parallel.pp_stages} stages x {self.dist.world_size // cfg.parallel.pp_stages} "
                  f"replicas, " if self.pipeline else "")
        log.info(
            "ranks: %d (%s), %sZeRO stage %d, precision %s, micro-batch %d x accum %d -> global batch %d",
            self.dist.world_size, self.dist.device.type, layout, cfg.parallel.zero_stage, cfg.train.precision,
            cfg.train.micro_batch_size, cfg.train.grad_accum_steps, self.ds_config["train_batch_size"],
        )
        for name, count in self.param_report.items():
            log.info("parameters %-28s %15s", name, f"{count:,}")
        for stage in self.stage_layout or []:
            kinds = stage["kinds"]
            log.info("pipeline stage %d: layers %d-%d (%s ... %s), %s parameters", stage["stage"], *stage["layers"],
                     kinds[0], kinds[-1], f"{stage['parameters']:,}")

    # ---------------------------------------------------------------------------------- loop

    def _all_ranks_agree(self, flag: bool) -> bool:
        """True when any rank raised ``flag``."""
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.dist.device)).item() > 0)

    def _micro_batch(self, samples_sink, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          object]:
        """Forward, agree on finiteness, backward and step; skipped micro-batches are retried with the next one."""
        in_a_row = 0
        while True:
            batch = next(self.batches).to(self.dist.device)
            if samples_sink is not None:
                samples_sink.write(json.dumps({"step": step + 1, "micro": micro, "keys": list(batch.keys)}) + "\n")
            loss, terms, counts = self.engine(**batch.as_dict())
            if not self._all_ranks_agree(not bool(torch.isfinite(loss.detach()).all())):
                self.engine.backward(loss)
                self.engine.step()
                return loss, terms, counts, batch
            in_a_row += 1
            self.nonfinite_skipped += 1
            log.warning("non-finite loss at step %d: micro-batch skipped on every rank (%d in a row, %d in all)",
                        step + 1, in_a_row, self.nonfinite_skipped)
            if in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
                path = self._save(step, f"diagnostic: {in_a_row} non-finite losses in a row")
                log.error("stopping: %d non-finite losses in a row; diagnostic checkpoint %s", in_a_row, path)
                raise TrainingStopped(NONFINITE_EXIT_CODE)

    def _pipeline_batch(self, samples_sink, step: int) -> tuple[float, list]:
        """One pipeline step (DeepSpeed's schedule: every micro-batch's forward and backward, then the update).

        The first and the last stage of a replica both read the micro-batches. A non-finite loss cannot be
        skipped inside the schedule (the update is already applied when the loss is known): it is counted,
        and after train.max_nonfinite_in_a_row such steps in a row the run stops with a diagnostic checkpoint.
        """
        read = []

        def on_batch(batch):
            if samples_sink is not None:
                samples_sink.write(json.dumps({"step": step + 1, "micro": len(read), "keys": list(batch.keys)}) + "\n")
            read.append(batch)

        loss = float(self.engine.train_batch(pipeline_batches(self.batches, on_batch)))  # same value on every rank
        if np.isfinite(loss):
            self.nonfinite_in_a_row = 0
            return loss, read
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        log.warning("non-finite loss at step %d (pipeline: the update was applied; %d in a row, %d in all)",
                    step + 1, self.nonfinite_in_a_row, self.nonfinite_skipped)
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
            path = self._save(step + 1, f"diagnostic: {self.nonfinite_in_a_row} non-finite losses in a row")
            log.error("stopping: %d non-finite losses in a row; diagnostic checkpoint %s", self.nonfinite_in_a_row, path)
            raise TrainingStopped(NONFINITE_EXIT_CODE)
        return loss, read

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
                if self._all_ranks_agree(self.stop.requested):
                    self._save(step + 1, f"signal {self.stop.signal_name or 'on another rank'}")
                    self._requeue_exit(step + 1)
                every, minutes = cfg.checkpoint.save_every_steps, cfg.checkpoint.save_every_minutes
                due = minutes > 0 and self._all_ranks_agree(time.perf_counter() - last_save >= 60 * minutes)
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
        t, device = self.cfg.train, self.dist.device
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        loss_sum = torch.zeros(1, device=device)
        weighted_terms = torch.zeros(len(TERMS), device=device)
        term_counts = torch.zeros(len(TERMS), device=device)
        work = torch.zeros(3, dtype=torch.float64, device=device)  # tokens, samples, model FLOPs

        def count_work(batch) -> torch.Tensor:
            lengths = batch.attention_mask.sum(1).tolist()
            return torch.tensor([sum(lengths), batch.num_samples, flops.step_flops(lengths, batch.pixel_values.shape[0])],
                                dtype=torch.float64, device=device)

        if self.pipeline:
            mean_loss, batches = self._pipeline_batch(samples_sink, step)
            # Only the last stage of each replica counts, so the sums below cover each sample once.
            for terms, counts in self.stage_loss.take_records():
                weighted_terms += terms * counts
                term_counts += counts
            if self.last_stage:
                for batch in batches:
                    work += count_work(batch)
        else:
            for micro in range(t.grad_accum_steps):
                loss, terms, counts, batch = self._micro_batch(samples_sink, step, micro)
                loss_sum += loss.detach().float()
                weighted_terms += terms * counts
                term_counts += counts
                work += count_work(batch)
            mean_loss = all_reduce_mean(loss_sum / t.grad_accum_steps).item()
        # Terms are logged as means over every scored item of the global batch (not means of rank means).
        weighted_terms, term_counts = all_reduce_sum(torch.stack([weighted_terms, term_counts])).unbind(0)
        term_means = (weighted_terms / term_counts.clamp_min(1)).tolist()
        tokens, samples, step_flops = all_reduce_sum(work).tolist()
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": mean_loss,
            **{f"loss/{name}": (value if n > 0 else None) for name, value, n in zip(TERMS, term_means,
                                                                                     term_counts.tolist())},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "mfu": step_flops / elapsed / (peak * 1e12 * self.dist.world_size),
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(device),
            "data/skipped_samples": self.loader.skipped,
            "nonfinite_skipped": self.nonfinite_skipped,
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
            "nonfinite_skipped": self.nonfinite_skipped,
            "losses": [h["loss"] for h in history],
        }


def _versions() -> dict:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
