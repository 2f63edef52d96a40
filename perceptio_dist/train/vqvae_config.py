"""Typed config of depth-tokenizer training (``perceptio-vqvae train``); recipes in recipes/vqvae/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..config import ConfigError, doc_field, load_typed_config, path_field
from ..model.config import DepthCodesConfig, DepthVQVAEConfig, check_depth_downsampling


@dataclass
class VQVAEDataConfig:
    scenes: Optional[str] = path_field("Folder of rendered scenes (perceptio-scenes): exact depth, randomly cropped.",
                                       None, folder=True, purpose="a folder of rendered scenes",
                                       remedy="Render them with `perceptio-scenes --out DIR --num N`.")
    shards: Optional[str] = path_field("Preprocessed shards: their depth.npy maps (teacher or ground truth), flipped.",
                                       None, folder=True, purpose="a folder of preprocessed shards (manifest.json)",
                                       remedy="Write them with `perceptio-preprocess`.")
    image_folder: Optional[str] = path_field("Images whose depth the teacher predicts once at start.", None,
                                             folder=True, purpose="a folder of images")
    teacher: Optional[str] = path_field("Depth Anything V2 folder for image_folder.", None, folder=True,
                                        purpose="a Depth Anything V2 folder in HF format",
                                        remedy="Point it at a local copy (nothing is downloaded).")
    teacher_input_size: int = doc_field("Square input size of the teacher (multiple of 14).", 518)
    crop_scale: list[float] = doc_field("Random crops of scene depth keep this fraction range of each side.",
                                   default_factory=lambda: [0.5, 1.0])
    flip: bool = doc_field("Random horizontal flips.", True)


@dataclass
class VQVAETrainConfig:
    output_dir: str = path_field("Run folder: checkpoints/, metrics.jsonl, and the final tokenizer.safetensors + "
                                 "tokenizer.json.", "runs/depth_vqvae", kind="output")
    tokens: DepthCodesConfig = doc_field("K (num_depth_codes) and the grid.", default_factory=DepthCodesConfig)
    depth_vqvae: DepthVQVAEConfig = doc_field("Architecture (its checkpoint field is ignored here).",
                                         default_factory=DepthVQVAEConfig)
    data: VQVAEDataConfig = doc_field("Training depth maps.", default_factory=VQVAEDataConfig)
    steps: int = doc_field("Optimizer steps.", 2000)
    batch_size: int = doc_field("Depth maps per rank per step.", 32)
    lr: float = doc_field("Peak Adam learning rate (encoder and decoder; the codebook follows the EMA).", 1e-3)
    warmup_steps: int = doc_field("Linear warmup steps, then cosine decay to 10%.", 100)
    commitment_weight: float = doc_field("Weight of the commitment loss ||z - sg(q)||^2.", 0.25)
    dead_code_threshold: float = doc_field("A code whose EMA assignment count falls below this is restarted.", 1.0)
    restart_every: int = doc_field("Check for dead codes every N steps (0: never).", 50)
    usage_window: int = doc_field("Codebook usage is the fraction of codes used in the last N steps.", 50)
    seed: int = doc_field("Seed of initialisation and of the per-step sampling and augmentation.", 0)
    log_every: int = doc_field("Write metrics every N steps.", 10)
    save_every: int = doc_field("Save a resumable checkpoint every N steps (0: only at the end).", 500)
    wandb: Literal["auto", "online", "offline", "disabled"] = doc_field("As logging.wandb in training recipes.", "disabled")
    progress_bar: bool = doc_field("Show a progress bar on rank 0.", True)
    excluded_files: list[str] = field(default_factory=list, metadata={"doc": (
        "Files that must never be training data (evaluation frames); training refuses to start if one is used.")})


def validate_vqvae(cfg: VQVAETrainConfig) -> None:
    def err(path: str, msg: str) -> ConfigError:
        return ConfigError(f"Config error at '{path}': {msg}")

    d = cfg.data
    if not (d.scenes or d.shards or d.image_folder):
        raise err("data", "set at least one of data.scenes, data.shards, data.image_folder.")
    if d.image_folder and not d.teacher:
        raise err("data.teacher", "data.image_folder needs a teacher (a Depth Anything V2 folder).")
    check_depth_downsampling(cfg.depth_vqvae.input_size, cfg.tokens.depth_grid, "depth_vqvae.input_size")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise err("data.crop_scale", "two fractions 0 < low <= high <= 1.")
    for name in ("steps", "batch_size", "usage_window", "log_every"):
        if getattr(cfg, name) <= 0:
            raise err(name, "must be positive.")
    if cfg.warmup_steps < 0 or cfg.warmup_steps >= cfg.steps:
        raise err("warmup_steps", f"must be in [0, steps={cfg.steps}).")


def load_vqvae_config(recipe: str, overrides: list[str] | None = None) -> VQVAETrainConfig:
    cfg = load_typed_config(VQVAETrainConfig, recipe, overrides, kind="vqvae")
    validate_vqvae(cfg)
    return cfg
