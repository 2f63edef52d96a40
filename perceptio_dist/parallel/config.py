"""How the ranks run the model: ZeRO or a pipeline, tensor parallelism, the DeepSpeed tuning file, timeouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import config_error, doc_field, path_field
from .layout import ParallelLayout


@dataclass
class ParallelConfig:
    mode: Literal["zero", "pipeline"] = doc_field(
        "'zero': data parallel with ZeRO-2/3 on the whole model. 'pipeline': DeepSpeed PipelineModule, the model cut "
        "into parallel.pp_stages stages, ZeRO-1 (or 0) across the data-parallel replicas of each stage.", "zero")
    zero_stage: Literal[0, 1, 2, 3] = doc_field(
        "DeepSpeed ZeRO stage: 3 shards parameters too (default for 8B), 2 shards gradients and optimizer states "
        "(mode zero); 1 shards optimizer states, 0 nothing (mode pipeline: DeepSpeed refuses 2 and 3 there).", 3)
    pp_stages: int = doc_field("Pipeline stages (mode pipeline); ranks / pp_stages data-parallel replicas. Stage s holds "
                          "ranks s x replicas ... (s + 1) x replicas - 1.", 1)
    tp_size: int = doc_field(
        "Tensor parallelism for the LLM (DeepSpeed AutoTP training): each decoder layer's q/k/v, gate and up "
        "projections column-sharded and o and down row-sharded over tp_size consecutive ranks; the vision tower, "
        "projector, embeddings, LM head, SAM2 and the VQ-VAE replicated. Mode zero with ZeRO-2 only (DeepSpeed's "
        "AutoTP takes ZeRO <= 2); ranks / tp_size data-parallel replicas. 1: off.", 1)
    pp_partition: Literal["parameters", "uniform"] = doc_field(
        "How decoder layers are dealt to stages when pp_layers_per_stage is null: balanced by trainable parameters "
        "(embedding + vision tower count for the first stage; LM head, SAM2 decoder for the last) or the same number "
        "of layers each.", "parameters")
    pp_layers_per_stage: Optional[list[int]] = doc_field(
        "Decoder layers per stage, e.g. [14, 18]; sums to model.backbone.text.num_layers. The first stage also holds "
        "the vision tower, projector and embeddings; the last the final norm, LM head, SAM2 and the VQ-VAE.", None)
    deepspeed_config: Optional[str] = path_field(
        "DeepSpeed JSON with ZeRO tuning (bucket sizes, prefetch, overlap). Batch sizes, precision, clipping and "
        "stage come from this config; a JSON value that contradicts them is an error. Relative paths are resolved "
        "against the working directory, then the repository root.",
        None, purpose="the DeepSpeed JSON with ZeRO tuning",
        remedy="Point it at one of ds_configs/*.json (or your own), or set it to null for DeepSpeed's defaults.",
    )
    backend: Literal["auto", "nccl", "gloo"] = doc_field("torch.distributed backend; 'auto': nccl on GPUs, gloo on CPU.", "auto")
    zero_init: bool = doc_field("Under ZeRO-3, create the backbone already partitioned (deepspeed.zero.Init), so no rank "
                           "ever holds the full model.", True)
    timeout_minutes: float = doc_field(
        "Collective timeout: a rank that waits longer for its peers (a hung, frozen or cut-off node) fails instead of "
        "hanging, and the job ends so that it can resume. Fractions are allowed (0.5: 30 s). Set it above the longest "
        "wait that is not a failure: a checkpoint save or the first step's compilation.", 30.0)

    def check(self, at: str = "parallel") -> None:
        """The section's own rules; those that need the model (layers, heads, LoRA) are in config/rules.py."""
        if self.tp_size < 1:
            raise config_error(f"{at}.tp_size", f"must be >= 1 (1: no tensor parallelism), got {self.tp_size}.")
        if self.tp_size > 1 and (self.mode != "zero" or self.zero_stage != 2):
            raise config_error(f"{at}.tp_size", f"tensor parallelism runs with {at}.mode=zero and {at}.zero_stage=2 "
                               f"(DeepSpeed's AutoTP training takes ZeRO <= 2), got mode {self.mode!r}, stage "
                               f"{self.zero_stage}.")
        if self.timeout_minutes <= 0:
            raise config_error(f"{at}.timeout_minutes", "must be positive.")
        if self.mode == "zero":
            if self.zero_stage not in (2, 3):
                raise config_error(f"{at}.zero_stage", f"mode 'zero' runs ZeRO-2 or ZeRO-3, got {self.zero_stage} "
                                   f"(stages 0 and 1 are for {at}.mode=pipeline).")
            if self.pp_stages != 1 or self.pp_layers_per_stage is not None:
                raise config_error(f"{at}.pp_stages", f"pipeline stages need {at}.mode=pipeline.")
            return
        if self.zero_stage not in (0, 1):
            raise config_error(f"{at}.zero_stage", f"DeepSpeed pipelines run with ZeRO-1 or 0, got {self.zero_stage}: "
                               f"set {at}.zero_stage=1.")
        if self.pp_stages < 2:
            raise config_error(f"{at}.pp_stages", f"mode 'pipeline' needs at least 2 stages, got {self.pp_stages}.")

    def layout(self, world_size: int, at: str = "parallel") -> ParallelLayout:
        """The run's layout on ``world_size`` ranks, or a config error naming the field that does not divide them."""
        if world_size % self.pp_stages:
            raise config_error(f"{at}.pp_stages", f"{world_size} ranks cannot be split into {self.pp_stages} pipeline "
                               "stages of equal size.")
        if world_size % self.tp_size:
            raise config_error(f"{at}.tp_size", f"{world_size} ranks cannot be split into tensor-parallel groups of "
                               f"{self.tp_size}.")
        return ParallelLayout(world_size, self.pp_stages, self.tp_size)
