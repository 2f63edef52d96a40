"""Builds the batch source a config asks for."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..config import PerceptioConfig
from ..model.spatial_tokens import SpatialTokenIds
from .conversation import ImageTokens
from .temporary_synthetic import SampleGeometry, TemporarySyntheticSource


def build_source(
    cfg: PerceptioConfig, tokenizer: PreTrainedTokenizerBase, token_ids: SpatialTokenIds, sam_image_size: int,
    image_tokens_per_tile: int,
):
    b = cfg.model.backbone
    geometry = SampleGeometry(
        tile_size=b.vision.image_size,
        sam_size=sam_image_size,
        depth_size=cfg.model.depth_vqvae.input_size,
        depth_grid=cfg.model.tokens.depth_grid,
        num_codes=cfg.model.tokens.num_depth_codes,
    )
    image_tokens = ImageTokens(b.image_start_token, b.image_token, b.image_end_token, image_tokens_per_tile)
    if cfg.data.source == "temporary_synthetic":
        return TemporarySyntheticSource(
            cfg.data.temporary_synthetic, cfg.data.seed, geometry, tokenizer, token_ids, image_tokens
        )
    raise ValueError(f"unknown data source {cfg.data.source}")  # unreachable: the config type lists the sources
