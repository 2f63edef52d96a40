"""The training data of a run: the shard loader for this rank, built from the config (model geometry included)."""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from ..config.training import PerceptioConfig
from ..model.depth_vqvae import is_trained_tokenizer_id, tokenizer_identity
from ..model.geometry import sample_geometry
from ..model.spatial_tokens import SpatialTokenIds
from ..registry import SAMPLE_OPTIONS
from .conversation import ImageTokens
from .loader import ShardLoader
from .sample_builder import SampleBuilder, SampleOptions

log = logging.getLogger(__name__)


def check_manifest_matches(manifest: dict, cfg: PerceptioConfig, folder: str) -> None:
    """Shards made for another depth tokenizer (geometry or identity) cannot feed this model."""
    depth = manifest["depth"]
    expected = {"size": cfg.model.depth_vqvae.input_size, "num_codes": cfg.model.tokens.num_depth_codes,
                "grid": cfg.model.tokens.depth_grid}
    diffs = [f"{k}: shards {depth[k]}, recipe {v}" for k, v in expected.items() if depth[k] != v]
    if diffs:
        raise ConfigError(f"Config error at 'data.shards': {folder} was preprocessed for another depth tokenizer "
                          f"({'; '.join(diffs)}). Re-run the preprocessing with the recipe's tokens/depth_vqvae.")
    if manifest.get("split") != "train":
        raise ConfigError(f"Config error at 'data.shards': {folder} holds '{manifest.get('split')}' data, not train.")
    check_shard_tokenizer(manifest, cfg, folder)


def check_shard_tokenizer(manifest: dict, cfg: PerceptioConfig, folder: str) -> None:
    """The codes in the shards must come from the model's own depth tokenizer: the model embeds code i as what the
    tokenizer meant by i. Random tokenizers (tests, demos) only warn; shards from before identities pass."""
    if not cfg.data.depth_tokens:
        return  # the ablation reads no codes
    if manifest["depth"].get("codes") is False:
        raise ConfigError(f"Config error at 'data.shards': {folder} is a teacher pass (depth maps, no codes). Train "
                          "the depth tokenizer on it, run the code pass (a preprocessing recipe with from_shards "
                          "naming this folder), and point data.shards at the code pass's output.")
    if "identities" not in manifest or "depth_tokenizer" not in manifest["identities"]:
        return
    shards = manifest["identities"]["depth_tokenizer"]
    model = tokenizer_identity(cfg.model.depth_vqvae.checkpoint)
    if not (is_trained_tokenizer_id(shards) and is_trained_tokenizer_id(model)):
        log.warning("depth codes unchecked: the shards in %s were made by depth tokenizer %s and the model's is %s "
                    "(random weights, or a file without an id: fine for tests, meaningless for a real run)",
                    folder, shards, model)
        return
    if shards == model:
        return
    raise ConfigError(
        f"Config error at 'data.shards': the depth codes in {folder} were made by depth tokenizer {shards}, but the "
        f"model's tokenizer (model.depth_vqvae.checkpoint = {cfg.model.depth_vqvae.checkpoint}) is {model}. The model "
        "would read every code as another depth. Point model.depth_vqvae.checkpoint at the tokenizer that made the "
        "shards, or run the code pass again with this tokenizer (it rebuilds every shard whose tokenizer differs).")


def build_sample_builder(cfg: PerceptioConfig, tokenizer: PreTrainedTokenizerBase,
                         token_ids: SpatialTokenIds, training: bool = False) -> SampleBuilder:
    """Stored sample -> model inputs, with the model's tiling and token layout (training and evaluation, which
    read it from the same config; ``training`` lets an experiment add training-only input transforms)."""
    b = cfg.model.backbone
    geometry = sample_geometry(cfg.model)
    options = SampleOptions()
    for part in SAMPLE_OPTIONS.values():
        part.configure(cfg, training, token_ids, options)
    image_tokens = ImageTokens(b.image_start_token, b.image_token, b.image_end_token, geometry.image_tokens_per_tile,
                               after_question=options.image_after_question)
    return SampleBuilder(tokenizer, token_ids, image_tokens, geometry, cfg.data.max_seq_len, cfg.data.depth_tokens,
                         input_transforms=tuple(options.input_transforms))


def build_loader(cfg: PerceptioConfig, tokenizer: PreTrainedTokenizerBase, token_ids: SpatialTokenIds,
                 rank: int, world_size: int) -> ShardLoader:
    folder = cfg.data.shards  # resolved when the config was loaded (a folder or a URL)
    builder = build_sample_builder(cfg, tokenizer, token_ids, training=True)
    d = cfg.data
    try:
        loader = ShardLoader(folder, d.task_weights, d.seed, rank, world_size, cfg.train.grad_accum_steps,
                             cfg.train.micro_batch_size, builder, d.num_workers, tokenizer.pad_token_id,
                             shuffle_window=d.shuffle_window, damaged_shards=d.damaged_shards, verify=d.verify,
                             cache_dir=d.cache_dir,
                             max_tokens_per_row=(d.max_tokens_per_row or d.max_seq_len) if d.packing else None,
                             curriculum=[(phase.until_step, phase.task_weights) for phase in d.curriculum])
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"Config error at 'data.task_weights': {exc}") from None
    check_manifest_matches(loader.manifest, cfg, folder)
    return loader
