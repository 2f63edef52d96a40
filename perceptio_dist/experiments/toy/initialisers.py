"""How the toy world starts a fresh model (registered with the core's initialisers, registry.py; a checkpoint's
weights always win):

* ``model.backbone.vision.position_init: sincos_2d``: a random-weight vision tower's patch position embeddings start
  as fixed-frequency 2D sines and cosines of row and column (as MAE), so where a patch is can be read out linearly
  from the first step; they stay trainable.
* ``model.tokens.code_embedding_init: depth_order``: a model trained from scratch sees K code tokens as K unrelated
  symbols: to compare two cells it must first learn which code means nearer. ``depth_order`` gives every code's
  input-embedding and LM-head row a component along one fixed direction, proportional to the standardised mean
  depth that code decodes to (a map made of that code only), so "nearer" is a direction from the first step. The
  rows stay trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ConfigError
from ...config.extensions import extension_value
from ...model.depth_vqvae import DepthVQVAE
from ...model.spatial_tokens import SpatialTokenIds
from ...model.zero_params import editable
from ...registry import BACKBONE_INITIALISERS, CODE_ROW_INITIALISERS


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[side * side, dim] embeddings of a side x side patch grid in row-major order: the first half of the
    channels sines and cosines of the row at dim / 4 frequencies, the second half the same of the column."""
    if dim % 4:
        raise ConfigError(f"Config error at 'model.backbone.vision.hidden_size': sincos_2d positions need a multiple "
                          f"of 4, got {dim}.")
    quarter = dim // 4
    frequencies = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def set_sincos_positions(position_embeddings: torch.nn.Parameter, side: int) -> None:
    """Patch positions (the [CLS] row stays zero) set to sincos_2d, ZeRO-3 aware (rank 0's values broadcast)."""
    with editable([position_embeddings]):
        table = sincos_2d(side, position_embeddings.shape[-1]).to(position_embeddings.dtype)
        position_embeddings[0, 0].zero_()
        position_embeddings[0, 1:] = table


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


def sincos_positions(model, backbone_cfg) -> None:
    """model.backbone.vision.position_init: sincos_2d."""
    vision = backbone_cfg.vision
    if extension_value(vision, "position_init") == "sincos_2d":
        set_sincos_positions(model.model.vision_tower.embeddings.position_embeddings,
                             vision.image_size // vision.patch_size)


def depth_ordered_code_rows(backbone, vqvae: DepthVQVAE, token_ids: SpatialTokenIds, model_cfg, seed: int) -> None:
    """model.tokens.code_embedding_init: depth_order."""
    if extension_value(model_cfg.tokens, "code_embedding_init") == "depth_order":
        order_code_rows(backbone.get_input_embeddings(), backbone.lm_head, vqvae, token_ids, seed + 3)


BACKBONE_INITIALISERS.register("sincos_positions", sincos_positions)
CODE_ROW_INITIALISERS.register("depth_order", depth_ordered_code_rows)
