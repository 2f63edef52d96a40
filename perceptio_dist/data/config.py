"""What training reads: shards, task mixing and its curriculum, packing, and the depth block's place in answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import config_error, doc_field, path_field

SHARD_URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "file://", "az://", "abfs://")
TASKS = ("referring_seg", "relative_depth", "depth", "vqa")


@dataclass
class CurriculumPhase:
    until_step: int = doc_field("The phase holds for the optimizer steps before this one (after the previous "
                                "phase's); data.task_weights hold after the last phase.")
    task_weights: dict[str, float] = doc_field(
        "The phase's sampling weight per task, as data.task_weights; tasks missing here are weighted 0.",
        default_factory=dict)


@dataclass
class DataConfig:
    shards: Optional[str] = path_field(
        "Folder written by the preprocessing job (preprocess/job.py, `perceptio-preprocess`): manifest.json and <task>/*.tar shards; "
        "or a URL of that folder (https://, s3://, gs://, file://: anything fsspec opens), whose shards are fetched "
        "whole into data.cache_dir and checked against the manifest's sha256.", None,
        purpose="the folder of preprocessed training shards (manifest.json and <task>/*.tar)", folder=True,
        prefixes=SHARD_URL_SCHEMES,
        remedy="Write the shards with `perceptio-preprocess --recipe <preprocess recipe>` and set "
               "data.shards to that job's output_dir.",
    )
    cache_dir: Optional[str] = path_field(
        "Where shards of a URL data.shards are kept once fetched (a subfolder per URL); null: "
        "~/.cache/perceptio_dist/shards. Unused for a local folder.", None, kind="output")
    shuffle_window: int = doc_field(
        "Shards whose samples are shuffled together within an epoch (shards are visited in a new random order "
        "every epoch). A step reads from one window per task, so a rank keeps about 2 x this many shards per task "
        "open; the shard count of the largest task gives a full shuffle.", 4)
    damaged_shards: Literal["stop", "skip"] = doc_field(
        "A shard whose bytes do not match the manifest (size, or sha256 with data.verify=sha256 or a URL). stop: "
        "the run stops with a message naming the shard. skip: its samples are dropped and counted in "
        "data/skipped_samples. A malformed sample inside a good shard is always dropped and counted.", "stop")
    verify: Literal["size", "sha256"] = doc_field(
        "Check of a local shard when a worker opens it: size (a stat, also done by every rank at start) or sha256 "
        "(reads the whole shard once per worker). Shards fetched from a URL are always checked by sha256.", "size")
    task_weights: dict[str, float] = doc_field(
        "Relative sampling weight per task (referring_seg, relative_depth, depth, vqa); tasks missing from the "
        "shards or weighted 0 are not drawn.",
        default_factory=lambda: {"referring_seg": 1.0, "relative_depth": 1.0, "depth": 0.5, "vqa": 0.5},
    )
    curriculum: list[CurriculumPhase] = doc_field(
        "Earlier phases with their own task weights, e.g. [{until_step: 750, task_weights: {relative_depth: 1}}]: "
        "relative-depth questions only for the first 750 steps, then data.task_weights (AURORA's depth-first "
        "curriculum). Every task of any phase needs samples; resume and rank splits stay exact. []: none.",
        default_factory=list)
    num_workers: int = doc_field("DataLoader worker processes per rank (0: load in the training process).", 2)
    seed: int = doc_field("Seed of the task mixing and of the shard/sample shuffles (with the epoch).", 1234)
    max_seq_len: int = doc_field("Longest tokenised sample; longer samples are skipped and counted, not truncated.", 4096)
    packing: bool = doc_field(
        "Pack each micro-batch's samples into the fewest, evenly filled rows of at most data.max_tokens_per_row tokens "
        "(data/packing.py), instead of one padded row per sample. Same samples, same loss and gradients (attention "
        "never crosses samples; positions restart per sample); fewer padding tokens. Raise train.micro_batch_size "
        "with it to fill the rows. Mode zero only.", False)
    max_tokens_per_row: Optional[int] = doc_field(
        "Token budget of a packed row (data.packing); at least data.max_seq_len, so every sample fits a row. null: "
        "data.max_seq_len.", None)
    depth_tokens: bool = doc_field(
        "Put the depth block into assistant turns that have one. false: the no-depth-token ablation (same samples, "
        "the answer follows directly).", True
    )

    def check(self, at: str = "data") -> None:
        weightings = [(f"{at}.task_weights", self.task_weights)] + [
            (f"{at}.curriculum[{i}].task_weights", phase.task_weights) for i, phase in enumerate(self.curriculum)]
        for where, weights in weightings:
            unknown = sorted(set(weights) - set(TASKS))
            if unknown:
                raise config_error(where, f"unknown task(s) {unknown}; tasks are {list(TASKS)}.")
            if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
                raise config_error(where, "weights must be >= 0 with at least one positive.")
        if self.shuffle_window < 1:
            raise config_error(f"{at}.shuffle_window", f"must be >= 1 shard, got {self.shuffle_window}.")
        if self.num_workers < 0:
            raise config_error(f"{at}.num_workers", "must be >= 0.")
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < self.max_seq_len:
            raise config_error(f"{at}.max_tokens_per_row", f"{self.max_tokens_per_row} is below {at}.max_seq_len="
                               f"{self.max_seq_len}: a sample that long would fit no row. Raise it, or lower "
                               f"{at}.max_seq_len.")
