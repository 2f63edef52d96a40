"""Optimisation, checkpoints and logging: the trainer's own sections of a training recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import check_positive, config_error, doc_field, path_field


@dataclass
class TrainConfig:
    max_steps: int = doc_field("Optimizer steps to run.", 1000)
    micro_batch_size: int = doc_field("Samples per rank per forward/backward.", 1)
    grad_accum_steps: int = doc_field("Micro-batches accumulated per optimizer step.", 1)
    global_batch_size: Optional[int] = doc_field(
        "Samples per optimizer step over all ranks. Must equal micro_batch_size x grad_accum_steps x ranks; "
        "null: derived.", None
    )
    lr: float = doc_field("Peak learning rate (AdamW).", 2e-5)
    min_lr_ratio: float = doc_field("Cosine schedule floor as a fraction of lr.", 0.1)
    warmup_steps: int = doc_field("Linear warmup steps from 0 to lr.", 100)
    weight_decay: float = doc_field("AdamW weight decay (not applied to biases, norms and embeddings).", 0.0)
    betas: list[float] = doc_field("AdamW betas.", default_factory=lambda: [0.9, 0.95])
    eps: float = doc_field("AdamW epsilon.", 1e-8)
    grad_clip: float = doc_field("Clip the global gradient norm to this value; 0 disables.", 1.0)
    precision: Literal["fp32", "bf16"] = doc_field("Parameter/activation precision (bf16 keeps fp32 master weights).", "bf16")
    activation_checkpointing: bool = doc_field("Recompute LLM and vision layers in backward to save activation memory.", False)
    seed: int = doc_field("Seed of parameter initialisation and of any training-time randomness.", 42)
    deterministic: bool = doc_field(
        "Deterministic kernels only (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): on GPUs the losses "
        "after a resume then equal an uninterrupted run's bit for bit. Off, they agree to float round-off (atomics in "
        "some CUDA kernels reorder sums). Slower; a kernel with no deterministic version fails.", False)
    max_nonfinite_in_a_row: int = doc_field(
        "A micro-batch whose loss is not finite on any rank is skipped by every rank (no backward) and counted; "
        "after this many in a row the run saves a diagnostic checkpoint and stops with exit status 3.", 3)

    def check(self, at: str = "train") -> None:
        check_positive({f"{at}.max_steps": self.max_steps, f"{at}.micro_batch_size": self.micro_batch_size,
                        f"{at}.grad_accum_steps": self.grad_accum_steps})
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise config_error(f"{at}.warmup_steps", f"must be in [0, {at}.max_steps={self.max_steps}), got "
                               f"{self.warmup_steps}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise config_error(f"{at}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.")
        if len(self.betas) != 2 or not all(0 <= x < 1 for x in self.betas):
            raise config_error(f"{at}.betas", f"must be two numbers in [0, 1), got {self.betas}.")
        if self.lr <= 0:
            raise config_error(f"{at}.lr", f"must be positive, got {self.lr}.")
        if self.grad_clip < 0:
            raise config_error(f"{at}.grad_clip", f"must be >= 0, got {self.grad_clip}.")
        step = self.micro_batch_size * self.grad_accum_steps
        if self.global_batch_size is not None and self.global_batch_size % step:
            raise config_error(f"{at}.global_batch_size", f"{self.global_batch_size} is not a multiple of "
                               f"micro_batch_size x grad_accum_steps = {self.micro_batch_size} x "
                               f"{self.grad_accum_steps}, so no number of ranks can match it.")
        if self.max_nonfinite_in_a_row < 1:
            raise config_error(f"{at}.max_nonfinite_in_a_row", "must be at least 1.")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = path_field("Checkpoint folder; null: <logging.output_dir>/checkpoints.", None, kind="output")
    save_every_steps: int = doc_field("Save a DeepSpeed sharded checkpoint every N optimizer steps; 0: off.", 0)
    save_every_minutes: float = doc_field("Also save when this many minutes passed since the last save; 0: off.", 0.0)
    save_final: bool = doc_field("Save a checkpoint when training ends.", True)
    keep_last: int = doc_field("Keep the newest N complete checkpoints; older ones are deleted.", 3)
    resume: str = path_field(
        "'none': start fresh; 'auto': continue from the newest complete checkpoint in the folder, falling back past "
        "damaged ones (fresh start if there is none); or the path of one checkpoint (a global_stepN folder). A "
        "different rank count converts it to DeepSpeed's universal format first.", "none",
        keywords=("none", "auto"), must_exist=False)  # verified by the checkpoint code, with its own message
    verify_checksums: bool = doc_field("Check every file's sha256 against the checkpoint's marker before resuming "
                                       "(sizes always).", True)

    def check(self, at: str = "checkpoint") -> None:
        if self.save_every_steps < 0 or self.save_every_minutes < 0:
            raise config_error(f"{at}.save_every_steps", "save intervals must be >= 0.")
        if self.keep_last < 1:
            raise config_error(f"{at}.keep_last", "must be at least 1.")


@dataclass
class LoggingConfig:
    output_dir: str = path_field("Run folder: resolved config, metrics.jsonl, wandb files, checkpoints.", "runs/default",
                                 kind="output")
    log_every_steps: int = doc_field("Write metrics every N optimizer steps.", 1)
    wandb: Literal["auto", "online", "offline", "disabled"] = doc_field(
        "Weights & Biases mode. 'auto': online when WANDB_API_KEY is set, else offline (files under the run folder).",
        "auto",
    )
    wandb_project: str = doc_field("wandb project name.", "perceptio_dist")
    run_name: Optional[str] = doc_field("wandb run name; null: the output folder's name.", None)
    peak_tflops_per_device: Optional[float] = doc_field(
        "Peak dense TFLOP/s of one device for MFU. null: known GPUs from a table (bf16 dense), CPUs measured by a "
        "short matmul at start.", None
    )
    progress_bar: bool = doc_field("Show a progress bar on rank 0.", True)
    log_samples: bool = doc_field("Write the sample keys of every micro-batch to <output_dir>/samples/rank<r>.jsonl.", False)

    def check(self, at: str = "logging") -> None:
        check_positive({f"{at}.log_every_steps": self.log_every_steps})
