"""A training run's config: the components' sections assembled, loaded from a recipe and validated.

Also what an export records (its config.yaml) and what ``perceptio-plan`` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from ..data.config import DataConfig
from ..losses.config import ObjectiveConfig
from ..model.config import ModelConfig
from ..parallel.config import ParallelConfig
from ..train.config import CheckpointConfig, LoggingConfig, TrainConfig
from .fields import ConfigError, doc_field
from .paths import check_input_paths, resolve_paths
from .recipes import load_typed_config
from .rules import RULES
from .typed_yaml import build_dataclass, normalise_numbers


@dataclass
class PerceptioConfig:
    model: ModelConfig = doc_field("The model.", default_factory=ModelConfig)
    objective: ObjectiveConfig = doc_field("The composite objective.", default_factory=ObjectiveConfig)
    data: DataConfig = doc_field("Training data.", default_factory=DataConfig)
    train: TrainConfig = doc_field("Optimisation.", default_factory=TrainConfig)
    parallel: ParallelConfig = doc_field("Parallelism.", default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = doc_field("Checkpoints.", default_factory=CheckpointConfig)
    logging: LoggingConfig = doc_field("Metrics and outputs.", default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of the resolved config (recorded in checkpoints and metrics)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_config(recipe: str, overrides: Optional[list[str]] = None) -> PerceptioConfig:
    """Read a training recipe (shipped name or yaml path), apply dotted overrides, type-check and validate."""
    cfg = load_typed_config(PerceptioConfig, recipe, overrides)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> PerceptioConfig:
    cfg = resolve_paths(build_dataclass(PerceptioConfig, normalise_numbers(data), ""))
    validate(cfg)
    return cfg


def validate(cfg: PerceptioConfig) -> None:
    """Checks that need no file system and no process group (see :func:`validate_runtime` for those): every
    section's own, then the rules that join sections (config/rules.py)."""
    cfg.model.check("model")
    cfg.data.check("data")
    cfg.objective.check("objective")
    cfg.train.check("train")
    cfg.checkpoint.check("checkpoint")
    cfg.logging.check("logging")
    cfg.parallel.check("parallel")
    for rule in RULES:
        rule(cfg)


def validate_runtime(cfg: PerceptioConfig, world_size: int) -> None:
    """Checks that need the file system or the number of ranks. Called once at training start."""
    t = cfg.train
    replicas = cfg.parallel.layout(world_size).replicas
    derived = t.micro_batch_size * t.grad_accum_steps * replicas
    if t.global_batch_size is not None and t.global_batch_size != derived:
        raise ConfigError(
            f"Config error at 'train.global_batch_size': {t.global_batch_size} != micro_batch_size x "
            f"grad_accum_steps x data-parallel replicas = {t.micro_batch_size} x {t.grad_accum_steps} x {replicas} = "
            f"{derived}. Change one of them (e.g. train.grad_accum_steps="
            f"{max(1, t.global_batch_size // (t.micro_batch_size * replicas))}) or set train.global_batch_size=null."
        )
    if cfg.data.shards is None:
        raise ConfigError(
            "Config error at 'data.shards': training needs preprocessed shards. Write them with "
            "`perceptio-preprocess --recipe <preprocess recipe>` and set data.shards=<its output_dir>."
        )
    check_input_paths(cfg, first=("data.shards",))
