"""Depth-code token rows that start out ordered by the depth they decode to (model.tokens.code_embedding_init).

A model trained from scratch sees K code tokens as K unrelated symbols: to compare two cells it must first learn
which code means nearer. ``depth_order`` gives every code's input-embedding and LM-head row a component along one
fixed direction, proportional to the standardised mean depth that code decodes to (a map made of that code
only), so "nearer" is a direction from the first step. The rows stay trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from .depth_vqvae import DepthVQVAE
from .spatial_tokens import SpatialTokenIds
from .zero_params import editable


@torch.no_grad()
def code_depth_values(vqvae: DepthVQVAE) -> torch.Tensor:
    """[K] mean decoded value (normalised inverse depth: larger is nearer) of a map made of code k alone."""
    codes = torch.arange(vqvae.num_codes)[:, None].expand(-1, vqvae.num_tokens)
    return vqvae.decode(codes).float().mean(dim=(1, 2, 3))


@torch.no_grad()
def order_code_rows(embeddings: nn.Embedding, lm_head: nn.Linear, vqvae: DepthVQVAE, ids: SpatialTokenIds,
                    seed: int) -> torch.Tensor:
    """Add ``scale * z_k * u`` to code k's rows (z: standardised depth value, u: a unit vector drawn from
    ``seed``, scale: the rows' typical norm). Returns z."""
    values = code_depth_values(vqvae)
    z = (values - values.mean()) / values.std().clamp_min(1e-6)
    rows = slice(ids.code_start, ids.code_end)
    generator = torch.Generator().manual_seed(seed)
    with editable([embeddings.weight, lm_head.weight]):
        for weight in (embeddings.weight, lm_head.weight):
            u = torch.randn(weight.shape[1], generator=generator)
            u = u / u.norm()
            scale = weight[rows].float().norm(dim=1).mean()
            # The rows live where the backbone was built (a GPU under ZeRO-3's partitioned build); z and u on the CPU.
            shift = scale * z.to(weight.device)[:, None] * u.to(weight.device)[None]
            weight[rows] += shift.to(weight.dtype)
    return z
