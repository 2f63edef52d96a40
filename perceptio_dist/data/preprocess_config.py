"""Typed config of the preprocessing job (ray_jobs/preprocess.py). Same machinery as training recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import (
    TASKS,
    ConfigError,
    DepthVQVAEConfig,
    SpatialTokensConfig,
    _doc,
    _is_power_of_two,
    load_typed_config,
)

SOURCE_TYPES = ("synthetic", "refcoco", "coco", "llava", "image_folder", "hardblink")


@dataclass
class SourceConfig:
    type: Literal["synthetic", "refcoco", "coco", "llava", "image_folder", "hardblink"] = _doc(
        "Adapter: synthetic (scene folders from perceptio-scenes), refcoco (refer toolkit layout), coco (instances "
        "json), llava (conversation json), image_folder (depth-only), hardblink (evaluation only).", "synthetic")
    path: str = _doc("Root of the source: scenes folder, refer data root, instances.json, llava json, image folder "
                     "or HardBLINK folder.", "")
    images: Optional[str] = _doc("Images folder (coco, refcoco, llava); null: next to `path`.", None)
    dataset: Literal["refcoco", "refcoco+", "refcocog"] = _doc("refcoco: which refer dataset under `path`.", "refcoco")
    split_by: str = _doc("refcoco: annotation split file, refs(<split_by>).p (unc, umd or google).", "unc")
    splits: list[str] = _doc("refcoco: which refer splits to keep.", default_factory=lambda: ["train"])
    tasks: list[str] = _doc("synthetic: which tasks to generate from each scene.", default_factory=lambda: list(TASKS))
    max_records: Optional[int] = _doc("Keep at most this many records of the source (in its order); null: all.", None)


@dataclass
class TeacherConfig:
    pretrained_path: Optional[str] = _doc(
        "Depth Anything V2 in HF format (DepthAnythingForDepthEstimation), a local folder. null: no teacher; "
        "then only sources with ground-truth depth may ask for depth targets.", None)
    use_ground_truth: bool = _doc("Use a source's ground-truth depth (synthetic scenes) instead of the teacher.", True)
    batch_size: int = _doc("Images per teacher forward.", 8)
    concurrency: int = _doc("Teacher actors in the Ray Data actor pool.", 1)
    num_gpus: float = _doc("GPUs per teacher actor (0 on CPU machines).", 0.0)
    num_cpus: float = _doc("CPUs reserved per teacher actor.", 1.0)
    input_size: int = _doc("Shorter side the teacher sees (a multiple of 14; 518 for Depth Anything V2).", 518)


@dataclass
class PreprocessConfig:
    output_dir: str = _doc("Where shards, manifest.json and quarantine.jsonl are written.", "runs/shards")
    split: Literal["train", "eval"] = _doc("train jobs refuse evaluation-only sources (HardBLINK).", "train")
    shard_size: int = _doc("Samples per shard (per task).", 1000)
    sources: list[SourceConfig] = _doc("The raw sources to read.", default_factory=list)
    teacher: TeacherConfig = _doc("The depth teacher.", default_factory=TeacherConfig)
    tokens: SpatialTokensConfig = _doc("K and the grid of the depth codes (must match training).",
                                       default_factory=SpatialTokensConfig)
    depth_vqvae: DepthVQVAEConfig = _doc("The depth tokenizer that turns depth maps into codes.",
                                         default_factory=DepthVQVAEConfig)
    vqvae_seed: int = _doc("Seed of a random tokenizer when depth_vqvae.checkpoint is null (tests, demos).", 0)
    decode_concurrency: int = _doc("Parallel decode/validate tasks (one CPU each).", 2)
    tokenizer_num_cpus: float = _doc("CPUs reserved by the VQ-VAE encoding actor.", 1.0)
    max_image_side: int = _doc("Images whose longer side exceeds this are downscaled before storing.", 1024)


def validate_preprocess(cfg: PreprocessConfig) -> None:
    def err(path: str, msg: str) -> ConfigError:
        return ConfigError(f"Config error at '{path}': {msg}")

    if not cfg.sources:
        raise err("sources", "list at least one source.")
    if cfg.shard_size <= 0:
        raise err("shard_size", "must be positive.")
    for i, src in enumerate(cfg.sources):
        if not src.path:
            raise err(f"sources[{i}].path", "is required.")
        bad = sorted(set(src.tasks) - set(TASKS))
        if bad:
            raise err(f"sources[{i}].tasks", f"unknown task(s) {bad}; tasks are {list(TASKS)}.")
        if cfg.split == "train" and src.type == "hardblink":
            raise err(f"sources[{i}].type", "HardBLINK is evaluation data: never train on it (use split: eval).")
    ratio = cfg.depth_vqvae.input_size / cfg.tokens.depth_grid
    if ratio != int(ratio) or not _is_power_of_two(int(ratio)) or int(ratio) < 2:
        raise err("depth_vqvae.input_size", "input_size/tokens.depth_grid must be a power of two >= 2.")
    if cfg.teacher.input_size % 14:
        raise err("teacher.input_size", "must be a multiple of 14 (the ViT patch size).")
    if cfg.teacher.num_cpus <= 0 or cfg.tokenizer_num_cpus <= 0:
        raise err("teacher.num_cpus", "CPU reservations must be positive (a Ray actor needs a share of a CPU).")
    for name in ("batch_size", "concurrency"):
        if getattr(cfg.teacher, name) <= 0:
            raise err(f"teacher.{name}", "must be positive.")


def load_preprocess_config(recipe: str, overrides: list[str] | None = None) -> PreprocessConfig:
    cfg = load_typed_config(PreprocessConfig, recipe, overrides, kind="preprocess")
    validate_preprocess(cfg)
    return cfg
