"""The input geometry of a Perceptio model, from its config alone: what every training or evaluation sample must
match. One factory, so data code never reaches into a built model for these numbers."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .backbone import image_tokens_per_tile
from .seg_head import sam2_image_size


@dataclass(frozen=True)
class SampleGeometry:
    """Sizes every sample must match."""

    tile_size: int  # InternVL tile side
    max_tiles: int
    image_tokens_per_tile: int  # <IMG_CONTEXT> tokens per tile after pixel shuffle
    sam_size: int  # SAM2 input side
    depth_size: int  # VQ-VAE input side
    num_depth_tokens: int  # N
    num_codes: int  # K


def sample_geometry(cfg: ModelConfig) -> SampleGeometry:
    """The geometry of the model ``cfg`` describes (equal to what the built model uses: tested)."""
    b = cfg.backbone
    return SampleGeometry(
        tile_size=b.vision.image_size, max_tiles=b.max_tiles, image_tokens_per_tile=image_tokens_per_tile(b),
        sam_size=sam2_image_size(cfg.seg_head.sam2_config), depth_size=cfg.depth_vqvae.input_size,
        num_depth_tokens=cfg.tokens.num_depth_tokens, num_codes=cfg.tokens.num_depth_codes,
    )
