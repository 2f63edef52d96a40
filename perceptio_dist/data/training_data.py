"""The training data of a run: the shard loader for this rank, built from the config and the model's geometry."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, PerceptioConfig, expand_path, resolve_path
from ..model.spatial_tokens import SpatialTokenIds
from .conversation import ImageTokens
from .loader import ShardLoader
from .sample_builder import SampleBuilder, SampleGeometry
from .shards import read_manifest


def check_manifest_matches(manifest: dict, cfg: PerceptioConfig, folder: str) -> None:
    """Shards made for another depth tokenizer geometry cannot feed this model."""
    depth = manifest["depth"]
    expected = {"size": cfg.model.depth_vqvae.input_size, "num_codes": cfg.model.tokens.num_depth_codes,
                "grid": cfg.model.tokens.depth_grid}
    diffs = [f"{k}: shards {depth[k]}, recipe {v}" for k, v in expected.items() if depth[k] != v]
    if diffs:
        raise ConfigError(f"Config error at 'data.shards': {folder} was preprocessed for another depth tokenizer "
                          f"({'; '.join(diffs)}). Re-run the preprocessing with the recipe's tokens/depth_vqvae.")
    if manifest.get("split") != "train":
        raise ConfigError(f"Config error at 'data.shards': {folder} holds '{manifest.get('split')}' data, not train.")


def build_sample_builder(cfg: PerceptioConfig, tokenizer: PreTrainedTokenizerBase, token_ids: SpatialTokenIds,
                         sam_image_size: int, image_tokens_per_tile: int) -> SampleBuilder:
    """Stored sample -> model inputs, with the model's tiling and token layout (training and evaluation)."""
    b = cfg.model.backbone
    geometry = SampleGeometry(
        tile_size=b.vision.image_size, max_tiles=b.max_tiles, image_tokens_per_tile=image_tokens_per_tile,
        sam_size=sam_image_size, depth_size=cfg.model.depth_vqvae.input_size,
        num_depth_tokens=cfg.model.tokens.num_depth_tokens, num_codes=cfg.model.tokens.num_depth_codes,
    )
    return SampleBuilder(tokenizer, token_ids,
                         ImageTokens(b.image_start_token, b.image_token, b.image_end_token, image_tokens_per_tile),
                         geometry, cfg.data.max_seq_len, cfg.data.depth_tokens)


def build_loader(cfg: PerceptioConfig, tokenizer: PreTrainedTokenizerBase, token_ids: SpatialTokenIds,
                 sam_image_size: int, image_tokens_per_tile: int, rank: int, world_size: int) -> ShardLoader:
    folder = str(resolve_path(expand_path(cfg.data.shards, "data.shards")))
    check_manifest_matches(read_manifest(resolve_path(folder)), cfg, folder)
    builder = build_sample_builder(cfg, tokenizer, token_ids, sam_image_size, image_tokens_per_tile)
    try:
        return ShardLoader(folder, cfg.data.task_weights, cfg.data.seed, rank, world_size, cfg.train.grad_accum_steps,
                           cfg.train.micro_batch_size, builder, cfg.data.num_workers, tokenizer.pad_token_id)
    except ValueError as exc:
        raise ConfigError(f"Config error at 'data.task_weights': {exc}") from None
