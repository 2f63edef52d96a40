"""Typed config of the preprocessing job (preprocess/job.py, `perceptio-preprocess`). Same machinery as training
recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, check_input_paths, config_error, doc_field, load_typed_config, path_field
from ..config.typed_yaml import tagged_members
from ..data.config import TASKS
from ..model.config import DepthCodesConfig, DepthVQVAEConfig, check_depth_downsampling

# The source types: each is a dataclass below, holding only its own fields (a tagged union on `type`), and an
# adapter module preprocess/sources/<type>.py with a function iter_<type>(source) (found by that name).


@dataclass
class SourceBase:
    """What every source has: its type, where its raw data is, and how many records to keep."""

    type: str = doc_field(
        "Adapter: synthetic (scene folders from perceptio-scenes), refcoco (refer toolkit layout), coco (instances "
        "json), llava (conversation json), image_folder (depth-only), hardblink (evaluation only). A source holds "
        "only its type's fields.", "synthetic")
    path: str = path_field("Root of the source: scenes folder, refer data root, instances.json, llava json, image "
                           "folder or HardBLINK folder.", "", purpose="the source's raw data (see sources[].type)",
                           remedy="Give the source's absolute path (a Ray job runs in a copy of the working folder).")
    max_records: Optional[int] = doc_field("Keep at most this many records of the source (in its order); null: all.", None)


@dataclass
class SyntheticSource(SourceBase):
    """Rendered scenes (perceptio-scenes) with exact depth and masks; the relative-depth questions are made here."""

    type: Literal["synthetic"] = "synthetic"
    tasks: list[str] = doc_field("Which tasks to generate from each scene.", default_factory=lambda: list(TASKS))
    questions_per_scene: int = doc_field(
        "Relative-depth questions (marker sets) per scene. Each is its own sample; more sets are cheap "
        "data for the one task a tiny model has the least of.", 1)
    point_counts: list[int] = doc_field("Numbers of points a relative-depth question may have (2-5), "
                                        "drawn uniformly.", default_factory=lambda: [3, 4, 5])
    marker_style: Literal["hardblink", "colour"] = doc_field(
        "How markers are drawn. hardblink: as the benchmark (red ring, white letter on black). colour: a "
        "toy-only simplification legible at a tiny model's input (a disc in the letter's own colour, the letter on "
        "it); models trained on it see HardBLINK's style only at evaluation.", "hardblink")
    marker_grid: Optional[int] = doc_field(
        "Every marker in its own cell of this grid (set it to the depth grid) and the closest point "
        "also closest by its cell's mean depth, so perfect depth tokens answer the question; null: not enforced.",
        None)
    marker_step: bool = doc_field(
        "Relative-depth answers first read each marker out of the depth map ('A at 3,5 near 7; B at "
        "3,1 near 3. (A)': depth-grid cell, nearness 0-9), then answer; needs marker_grid. A chain-of-thought "
        "option after AURORA (marker coordinates, then depth); the ablation without depth tokens gets the same "
        "text.", False)
    marker_step_format: Literal["cells", "nearness", "scan"] = doc_field(
        "With marker_step: the step's form. cells: 'A at 3,5 near 7; B at 3,1 near 3. (A)'. nearness: "
        "'A near 7; B near 3. (A)'. scan (toy-only): the marker band's cells in reading order, three rows of one "
        "character per cell (the marker there or -, the nearest marker's level so far as K-T = 0-9, its letter), "
        "then the answer: '--A--B--|--KKKMMM|--AAABBB. (B)'; every character is a read at a fixed distance, the "
        "lookup a tiny model learns (docs/research, the toy world). Needs a tokenizer that keeps the row "
        "characters apart (the builtin tiny BPE does).", "cells")

    def check(self, at: str) -> None:
        bad = sorted(set(self.tasks) - set(TASKS))
        if bad:
            raise config_error(f"{at}.tasks", f"unknown task(s) {bad}; tasks are {list(TASKS)}.")
        if self.questions_per_scene < 1:
            raise config_error(f"{at}.questions_per_scene", "must be at least 1.")
        if not self.point_counts or any(not 2 <= n <= 5 for n in self.point_counts):
            raise config_error(f"{at}.point_counts", f"each count must be 2-5 (letters A-E), got {self.point_counts}.")
        if self.marker_grid is not None and self.marker_grid < 1:
            raise config_error(f"{at}.marker_grid", "must be a positive grid size or null.")
        if self.marker_step and self.marker_grid is None:
            raise config_error(f"{at}.marker_step", "reads markers out of depth-grid cells: set marker_grid too.")

    def question_rules(self):
        """The synthetic relative-depth question rules these fields describe (preprocess/scenes/tasks.py)."""
        from .scenes.tasks import PointRules, QuestionRules

        return QuestionRules(per_scene=self.questions_per_scene, counts=tuple(self.point_counts),
                             marker_style=self.marker_style, points=PointRules(grid=self.marker_grid),
                             marker_step=self.marker_step, step_format=self.marker_step_format)


@dataclass
class ImageSource(SourceBase):
    """A source whose images sit in a folder of their own."""

    images: Optional[str] = path_field("Images folder; null: next to `path` (refcoco: <path>/images).", None,
                                       purpose="the source's images folder", folder=True)


@dataclass
class RefcocoSource(ImageSource):
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit's layout."""

    type: Literal["refcoco"] = "refcoco"
    dataset: Literal["refcoco", "refcoco+", "refcocog"] = doc_field("Which refer dataset under `path`.", "refcoco")
    split_by: str = doc_field("Annotation split file, refs(<split_by>).p (unc, umd or google).", "unc")
    splits: list[str] = doc_field("Which refer splits to keep.", default_factory=lambda: ["train"])


@dataclass
class CocoSource(ImageSource):
    """COCO instances json (every annotated object becomes a referring question by its category)."""

    type: Literal["coco"] = "coco"


@dataclass
class LlavaSource(ImageSource):
    """LLaVA-style conversation json (visual question answering)."""

    type: Literal["llava"] = "llava"


@dataclass
class ImageFolderSource(SourceBase):
    """A folder of images and nothing else: depth-only samples from the teacher."""

    type: Literal["image_folder"] = "image_folder"


@dataclass
class HardblinkSource(SourceBase):
    """The HardBLINK relative-depth benchmark (evaluation only)."""

    type: Literal["hardblink"] = "hardblink"


SourceConfig = (SyntheticSource | RefcocoSource | CocoSource | LlavaSource | ImageFolderSource | HardblinkSource)
SOURCE_TYPES = tuple(tagged_members(SourceConfig))


@dataclass
class TeacherConfig:
    pretrained_path: Optional[str] = path_field(
        "Depth Anything V2 in HF format (DepthAnythingForDepthEstimation), a local folder or a model id already in "
        "the local Hugging Face cache. null: no teacher; then only sources with ground-truth depth may ask for depth "
        "targets.", None, must_exist=False)  # a cache id is not a path: the job checks it
    use_ground_truth: bool = doc_field("Use a source's ground-truth depth (synthetic scenes) instead of the teacher.", True)
    batch_size: int = doc_field("Images per teacher forward.", 8)
    concurrency: int = doc_field("Teacher actors in the Ray Data actor pool.", 1)
    num_gpus: float = doc_field("GPUs per teacher actor (0 on CPU machines).", 0.0)
    num_cpus: float = doc_field("CPUs reserved per teacher actor.", 1.0)
    input_size: int = doc_field("Shorter side the teacher sees (a multiple of 14; 518 for Depth Anything V2).", 518)


@dataclass
class PreprocessConfig:
    output_dir: str = path_field("Where shards, manifest.json and quarantine.jsonl are written.", "runs/shards",
                                 kind="output")
    split: Literal["train", "eval"] = doc_field("train jobs refuse evaluation-only sources (HardBLINK).", "train")
    shard_size: int = doc_field("Samples per shard (per task).", 1000)
    sources: list[SourceConfig] = doc_field("The raw sources to read.", default_factory=list)
    teacher: TeacherConfig = doc_field("The depth teacher.", default_factory=TeacherConfig)
    tokens: DepthCodesConfig = doc_field("K and the grid of the depth codes (must match training).",
                                       default_factory=DepthCodesConfig)
    depth_vqvae: DepthVQVAEConfig = doc_field("The depth tokenizer that turns depth maps into codes.",
                                         default_factory=DepthVQVAEConfig)
    vqvae_seed: int = doc_field("Seed of a random tokenizer when depth_vqvae.checkpoint is null (tests, demos).", 0)
    decode_concurrency: int = doc_field("Parallel decode/validate tasks (one CPU each).", 2)
    tokenizer_num_cpus: float = doc_field("CPUs reserved by the VQ-VAE encoding actor.", 1.0)
    max_image_side: int = doc_field("Images whose longer side exceeds this are downscaled before storing.", 1024)
    depth_codes: bool = doc_field(
        "Encode the depth maps into codes with depth_vqvae. false: a teacher pass (shards hold images, masks and "
        "depth maps, no codes), whose maps the tokenizer is then trained on; a code pass (from_shards) adds the "
        "codes afterwards without running the teacher again.", True)
    from_shards: Optional[str] = path_field(
        "A code pass: read every sample, and its stored depth map, from this folder of teacher-pass shards "
        "(depth_codes: false) instead of from sources, and write it again with its codes. sources and the teacher "
        "are then unused.", None, folder=True, purpose="the output_dir of a teacher pass (manifest.json)",
        remedy="Run the teacher pass first (a preprocessing recipe with depth_codes: false).")


def validate_preprocess(cfg: PreprocessConfig) -> None:
    def err(path: str, msg: str) -> ConfigError:
        return ConfigError(f"Config error at '{path}': {msg}")

    if cfg.from_shards:
        if cfg.sources:
            raise err("sources", "a code pass (from_shards) reads its samples from the teacher-pass shards: leave "
                                 "sources empty.")
        if not cfg.depth_codes:
            raise err("depth_codes", "a code pass (from_shards) exists to add codes: set depth_codes: true.")
    elif not cfg.sources:
        raise err("sources", "list at least one source (or from_shards for a code pass).")
    if cfg.shard_size <= 0:
        raise err("shard_size", "must be positive.")
    for i, src in enumerate(cfg.sources):
        if not src.path:
            raise err(f"sources[{i}].path", "is required.")
        if cfg.split == "train" and src.type == "hardblink":
            raise err(f"sources[{i}].type", "HardBLINK is evaluation data: never train on it (use split: eval).")
        if isinstance(src, SyntheticSource):
            src.check(f"sources[{i}]")
    cfg.tokens.check("tokens")
    check_depth_downsampling(cfg.depth_vqvae.input_size, cfg.tokens.depth_grid, "depth_vqvae.input_size")
    if cfg.teacher.input_size % 14:
        raise err("teacher.input_size", "must be a multiple of 14 (the ViT patch size).")
    if cfg.teacher.num_cpus <= 0 or cfg.tokenizer_num_cpus <= 0:
        raise err("teacher.num_cpus", "CPU reservations must be positive (a Ray actor needs a share of a CPU).")
    for name in ("batch_size", "concurrency"):
        if getattr(cfg.teacher, name) <= 0:
            raise err(f"teacher.{name}", "must be positive.")


def check_preprocess_paths(cfg: PreprocessConfig) -> None:
    """At job start: every source and the depth tokenizer exist (the teacher is checked by the job: it may be a
    Hugging Face cache id). A teacher pass makes no codes, so it needs no tokenizer."""
    check_input_paths(cfg, skip=() if cfg.depth_codes else ("depth_vqvae.checkpoint",))


# Fields that never shape a shard's contents: where things are, and how much hardware works on them. A change
# to any of them rebuilds nothing (see content_fields).
_NOT_CONTENT = {"output_dir", "from_shards", "decode_concurrency", "tokenizer_num_cpus",
                "sources.path", "sources.images",
                "teacher.pretrained_path", "teacher.batch_size", "teacher.concurrency", "teacher.num_gpus",
                "teacher.num_cpus", "depth_vqvae.checkpoint"}


# The token spelling and initialiser the tokens section carried (at their defaults) when it was the model's whole
# token config; they never shaped a shard, but identities include them so that none changed when they left.
_TOKEN_FIELDS_IN_OLD_IDENTITIES = {"seg_token": "[SEG]", "depth_start_token": "<DEPTH_START>",
                                   "depth_end_token": "<DEPTH_END>", "depth_code_template": "<DEPTH_{}>",
                                   "code_embedding_init": "mean"}

# Likewise the fields every source carried when one dataclass held all types' fields, at their defaults (a field
# of another type never shaped a shard).
_SOURCE_FIELDS_IN_OLD_IDENTITIES = {
    "dataset": "refcoco", "split_by": "unc", "splits": ["train"], "tasks": list(TASKS), "max_records": None,
    "questions_per_scene": 1, "point_counts": [3, 4, 5], "marker_style": "hardblink", "marker_grid": None,
    "marker_step": False, "marker_step_format": "cells"}


def content_fields(cfg: PreprocessConfig) -> dict:
    """The preprocessing fields that shape what a shard holds (paths, resources and concurrency removed; the
    teacher and tokenizer weights are identified separately, by their identities)."""
    from dataclasses import asdict

    def strip(value, prefix: str):
        if isinstance(value, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in value.items() if f"{prefix}{k}" not in _NOT_CONTENT}
        if isinstance(value, list):
            return [strip(v, prefix) for v in value]
        return value

    fields = strip(asdict(cfg), "")
    if "tokens" in fields:  # identities as written before the section held K and the grid only (no shard rebuilt)
        fields["tokens"] = {**_TOKEN_FIELDS_IN_OLD_IDENTITIES, **fields["tokens"]}
    if "sources" in fields:  # and before each source type held only its own fields
        fields["sources"] = [{**_SOURCE_FIELDS_IN_OLD_IDENTITIES, **source} for source in fields["sources"]]
    if cfg.depth_vqvae.checkpoint or not cfg.depth_codes:  # the seed of a random tokenizer plays no part
        fields.pop("vqvae_seed")
    if not cfg.depth_codes:  # a teacher pass: the maps' size matters, not the tokenizer (retraining it rebuilds nothing)
        fields.pop("tokens")
        fields["depth_vqvae"] = {"input_size": cfg.depth_vqvae.input_size}
    if cfg.from_shards:  # a code pass: samples and shard layout come from the teacher pass (its checksums count)
        for name in ("sources", "teacher", "shard_size", "max_image_side"):
            fields.pop(name)
    return fields


def load_preprocess_config(recipe: str, overrides: list[str] | None = None) -> PreprocessConfig:
    cfg = load_typed_config(PreprocessConfig, recipe, overrides, kind="preprocess")
    validate_preprocess(cfg)
    return cfg
