"""Every tensor of the model on the rank's device, whatever DeepSpeed places itself.

Under ZeRO-3 with a partitioned build (zero.Init), DeepSpeed skips ``module.to(device)`` and moves only the
parameters of modules built outside zero.Init, never their buffers: the SAM2 head's positional encoding and the
depth VQ-VAE's codebook would stay on the CPU and the first forward would mix devices. ``place_unmanaged`` puts
every buffer and every parameter DeepSpeed does not partition on the device before the engine starts;
``check_placement`` verifies it after, naming what is elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn


def _partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: DeepSpeed owns where its shards live (possibly offloaded to the CPU on purpose)."""
    return hasattr(param, "ds_id")


def _tensors(module: nn.Module):
    """(qualified name, tensor) for every buffer and every parameter DeepSpeed does not partition."""
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                yield f"{prefix}.{name}" if prefix else name, sub, "buffer", name, buf
        for name, param in sub._parameters.items():
            if param is not None and not _partitioned(param):
                yield f"{prefix}.{name}" if prefix else name, sub, "parameter", name, param


@torch.no_grad()
def place_unmanaged(module: nn.Module, device: torch.device) -> None:
    """Move every buffer and every non-partitioned parameter to ``device``. Parameters keep their identity (an
    optimizer built before already holds them); tensors on the meta device cannot move and are left for
    ``check_placement`` to report."""
    for _, owner, kind, name, tensor in list(_tensors(module)):
        if tensor.device == device or tensor.is_meta:
            continue
        if kind == "buffer":
            owner._buffers[name] = tensor.to(device)
        else:
            tensor.data = tensor.data.to(device)


def check_placement(module: nn.Module, device: torch.device) -> None:
    """Raise, naming them, if buffers or non-partitioned parameters are not on ``device``."""
    wrong = [f"{qualified} ({kind}, on {tensor.device})" for qualified, _, kind, _, tensor in _tensors(module)
             if tensor.device != device]
    if wrong:
        shown = "; ".join(wrong[:8]) + (f"; and {len(wrong) - 8} more" if len(wrong) > 8 else "")
        raise RuntimeError(
            f"After the engine started, {len(wrong)} tensor(s) of the model are not on the rank's device {device}: "
            f"{shown}. The first forward would mix devices. A module added to the model must register its "
            "tensors as parameters or buffers (not as plain attributes) and must not be built on the meta device "
            "without being materialised.")
