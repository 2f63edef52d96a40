"""The composite objective's config: term weights and how the LM-head terms are computed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..config import config_error, doc_field


@dataclass
class ObjectiveConfig:
    """Weights and options of the composite objective (DESIGN.md section 2, losses/objective.py)."""

    text_weight: float = doc_field("Weight of next-token cross-entropy on answer text tokens.", 1.0)
    marker_weight: float = doc_field("Weight of full-vocabulary CE at [SEG], <DEPTH_START>, <DEPTH_END> targets.", 1.0)
    token_weight: float = doc_field("Weight of the restricted (K-way) CE at <DEPTH_k> targets.", 1.0)
    count_weight: float = doc_field("Weight of the depth-token count penalty.", 1.0)
    reconstruction_weight: float = doc_field("Weight of the soft-merge depth reconstruction L1.", 1.0)
    mask_weight: float = doc_field("Weight of the mask term as a whole.", 1.0)
    mask_bce_weight: float = doc_field("Factor of BCE inside the mask term.", 2.0)
    mask_dice_weight: float = doc_field("Factor of Dice inside the mask term.", 0.5)
    mask_point_samples: int = doc_field(
        "Mask losses use this many random points per mask when the target has more pixels; 0: always dense.", 12544
    )
    z_loss_weight: float = doc_field("Optional z-loss (mean squared log-partition) on all target positions; 0 disables.", 0.0)
    text_weighting: Literal["token", "sample", "square"] = doc_field(
        "How answer tokens weigh in the text term, which is a mean over the whole optimizer step (every micro-batch "
        "and rank, like every term). 'token': each token the same; 'sample': a sample's tokens 1/n each, so every "
        "sample counts the same whatever its answer length; 'square': 1/sqrt(n), InternVL 2.5's square averaging.",
        "token")
    implementation: Literal["auto", "reference", "fused_torch", "fused_triton"] = doc_field(
        "How the LM-head terms are computed. 'auto': fused_triton on GPUs with triton installed, else fused_torch "
        "(chunked, never the full logits); 'reference': the full fp32 logits of the target rows (tests, debugging).",
        "auto",
    )
    chunk_size: int = doc_field("Rows per chunk of the fused LM-head terms (a chunk holds rows x vocabulary fp32 logits).",
                           1024)
    lm_head_matmul: Literal["fp32", "tf32", "bf16"] = doc_field(
        "Precision of the fused back ends' LM-head GEMMs (logits, dH, dW); softmax statistics and the terms stay fp32. "
        "'tf32': TF32 tensor cores on GPUs for these GEMMs only (plain fp32 on the CPU); 'bf16': bf16 operands, fp32 "
        "accumulation and output; 'fp32': no reduced precision. Error against fp64: docs/training.md.", "tf32")

    def check(self, at: str = "objective") -> None:
        if self.chunk_size <= 0:
            raise config_error(f"{at}.chunk_size", "must be positive.")
        if self.mask_point_samples < 0:
            raise config_error(f"{at}.mask_point_samples", "must be >= 0.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_weight") and value < 0:
                raise config_error(f"{at}.{f.name}", f"must be >= 0, got {value}.")
