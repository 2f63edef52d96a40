"""The toy world's config fields, registered under the dotted keys they have always had (config/extensions.py): a
toy recipe, checkpoint or export sets them; the core's sections do not declare them, so the 8B recipes' dumps and
the core reference never show them. Their meaning: initialisers.py and sample_options.py."""

from __future__ import annotations

from typing import Literal, Optional

from ...config import config_error
from ...config.extensions import register_field
from ...data.config import TASKS, DataConfig
from ...model.config import BackboneConfig, SpatialTokensConfig, VisionArchitecture

OWNER = "toy"


def _probability(value: float, where: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise config_error(where, f"must be in [0, 1], got {value}.")


def _tasks(value: Optional[list[str]], where: str) -> None:
    bad = sorted(set(value or ()) - set(TASKS))
    if bad:
        raise config_error(where, f"unknown task(s) {bad}; tasks are {list(TASKS)}.")


register_field(
    VisionArchitecture, "position_init", Literal["random", "sincos_2d"], "random",
    "Start of a random-weight tower's patch position embeddings (a checkpoint's win). random: transformers' init. "
    "sincos_2d: fixed-frequency 2D sines and cosines of row and column (as MAE), so where a patch is can be read "
    "out linearly from the first step; they stay trainable.", OWNER)
register_field(
    BackboneConfig, "image_position", Literal["before_question", "after_question"], "before_question",
    "Where the image span sits in the first user turn. before_question: InternVL's chat template "
    "('<image>\\n{question}'). after_question: '{question}\\n<image>', so the distance from image token i to depth "
    "token i is the same for every question whatever its length. Training and evaluation read it from the same "
    "config.", OWNER)
register_field(
    SpatialTokensConfig, "code_embedding_init", Literal["mean", "depth_order"], "mean",
    "How a fresh model's code-token rows (input embedding and LM head) start. mean: the mean of the other rows "
    "(transformers' resizing). depth_order: plus a shared direction scaled by the depth each code decodes to, so "
    "nearer/farther is readable from the first step (experiments/toy/initialisers.py). A checkpoint's rows win.",
    OWNER)
register_field(
    DataConfig, "depth_context_noise", float, 0.0,
    "Training only: probability that each depth code in a block's *input* is replaced by a random code (the labels "
    "keep the true codes), so the block cannot be predicted from its own earlier codes alone and must be read from "
    "the image (drawn per sample key, so resume stays exact). 0: off.", OWNER, _probability)
register_field(
    DataConfig, "depth_context_noise_tasks", Optional[list[str]], None,
    "The tasks whose depth blocks get data.depth_context_noise; null: every task. A task left out keeps its true "
    "codes in the input, so an answer after the block can learn to read them: under the noise an answer can only "
    "trust what the image says, and then random or true codes in its chain change nothing.", OWNER, _tasks)
