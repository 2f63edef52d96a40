"""Model FLOPs for MFU, PaLM-style (Chowdhery et al. 2022, appendix B), counting the matmuls this model runs.

Per optimizer step, with a matmul of N weights costing 2 N per token forward, and 2 N each for the input gradient
and the weight gradient backward:
* LLM decoder: (4 * N_layers + 2 * N_trained) per token: forward and input gradient for every weight (the gradient
  flows on to the embeddings and the vision side), the weight gradient for the trained ones only (6 * N fully
  trained, 4 * N frozen, about 4 * N under LoRA), plus attention 12 * L * d * T per token for a sequence of
  length T, i.e. 12 * L * d * sum_i T_i^2 over the batch (4 * L * d forward; backward twice that);
* LM head: 6 * V * d per *target row* only: the fused loss computes logits for the rows that predict a label
  (answer tokens), not for the image and prompt tokens;
* vision: InternViT 2 * N_vision per patch token plus 4 * L_v * d_v * P^2 per tile of P patch tokens, times 3 when
  the tower is trained (its backward) and once when frozen; the projector's 2 * N_proj per image token, times 3
  when the tower behind it is trained, times 2 when only the projector is (no input gradient needed).
SAM2 and the VQ-VAE decoder are left out (small next to the LLM at 8B). MFU is these FLOPs over wall time,
divided by the device peak (bf16 dense on GPUs, by variant; measured fp32 matmul on CPUs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense bf16 peak TFLOP/s (no sparsity) by device-name fragment.
# Dense bf16 tensor-core peaks (fp16 for the V100) from NVIDIA's datasheets, matched on torch's device name, first
# match wins: the variants of one chip differ by clocks and power (an H100 PCIe card peaks 24 % below an SXM one).
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("V100", 125.0),
]


def gpu_peak_tflops(name: str) -> float | None:
    """The table's peak for a device called ``name`` (torch.cuda.get_device_name), or None."""
    for fragment, peak in GPU_PEAK_TFLOPS:
        if fragment in name:
            return peak
    return None


@dataclass(frozen=True)
class FlopsModel:
    llm_params: int  # decoder layers
    llm_layers: int
    llm_hidden: int
    lm_head_params: int  # V x d
    vision_params: int
    vision_layers: int
    vision_hidden: int
    patches_per_tile: int
    projector_params: int
    image_tokens_per_tile: int
    llm_trained_params: int | None = None  # None: all of llm_params
    trains_vision: bool = True
    trains_projector: bool = True

    def step_flops(self, sequence_lengths: list[int], num_tiles: int, target_rows: int | None = None) -> float:
        """FLOPs of the sequences (real tokens each), their ``num_tiles`` image tiles and ``target_rows`` rows that
        predict a label (None: every token, an upper bound)."""
        tokens = sum(sequence_lengths)
        rows = tokens if target_rows is None else target_rows
        trained = self.llm_params if self.llm_trained_params is None else self.llm_trained_params
        decoder = (4 * self.llm_params + 2 * trained) * tokens
        attention = 12 * self.llm_layers * self.llm_hidden * sum(t * t for t in sequence_lengths)
        head = 6 * self.lm_head_params * rows
        p = self.patches_per_tile
        tower = num_tiles * (2 * self.vision_params * p + 4 * self.vision_layers * self.vision_hidden * p * p)
        tower *= 3 if self.trains_vision else 1
        projector_passes = 3 if self.trains_vision else 2 if self.trains_projector else 1
        projector = projector_passes * 2 * self.projector_params * self.image_tokens_per_tile * num_tiles
        return float(decoder + attention + head + tower + projector)


def flops_model_for(model) -> FlopsModel:
    """Read the sizes from a PerceptioModel (works under ZeRO-3: full sizes via ds_numel)."""

    def count(module, trained_only: bool = False) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters()
                   if p.requires_grad or not trained_only)

    bb = model.backbone
    inner = bb.model
    cfg = bb.config
    lm = inner.language_model
    head = int(getattr(bb.lm_head.weight, "ds_numel", bb.lm_head.weight.numel()))
    vision_cfg = cfg.vision_config
    patches = (vision_cfg.image_size[0] // vision_cfg.patch_size[0]) ** 2
    return FlopsModel(
        llm_params=count(lm.layers),
        llm_layers=cfg.text_config.num_hidden_layers,
        llm_hidden=cfg.text_config.hidden_size,
        lm_head_params=head,
        vision_params=count(inner.vision_tower),
        vision_layers=vision_cfg.num_hidden_layers,
        vision_hidden=vision_cfg.hidden_size,
        patches_per_tile=patches,
        projector_params=count(inner.multi_modal_projector),
        image_tokens_per_tile=cfg.image_seq_length,
        llm_trained_params=count(lm.layers, trained_only=True),
        trains_vision=count(inner.vision_tower, trained_only=True) > 0,
        trains_projector=count(inner.multi_modal_projector, trained_only=True) > 0,
    )


def device_peak_tflops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure comes from)."""
    if configured is not None:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name)
        if peak is not None:
            return peak, f"table ({name})"
        return float("nan"), f"unknown GPU {name}: set logging.peak_tflops_per_device"
    return measure_cpu_tflops(), "measured fp32 matmul"


def measure_cpu_tflops(size: int = 512, seconds: float = 0.2) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12
