"""The InternVL backbone: transformers' native ``InternVLForConditionalGeneration``.

Built either from a local HF-native checkpoint (8B recipe) or from the architecture in the
config with random weights (tests, demo, meta-device planning). No ``trust_remote_code``.
Under ZeRO-3 the caller activates transformers' DeepSpeed integration first (see
``parallel/zero.py``); construction and resizing then happen on partitioned parameters.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration

from ..config import ConfigError
from ..registry import BACKBONE_INITIALISERS
from .config import BackboneConfig

log = logging.getLogger(__name__)


def choose_attention_implementation(requested: str, device: torch.device | str | None = None) -> str:
    """'auto' -> flash_attention_2 when flash-attn imports and the model runs on a GPU, else sdpa. ``device``: where
    the model is built (None: where training puts it, a GPU when there is one)."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None and on_gpu
    if requested == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError(
            "Config error at 'model.backbone.attn_implementation': flash_attention_2 needs the flash-attn package "
            "and a CUDA GPU (pip install '.[gpu]'). Use 'auto' to fall back to sdpa."
        )
    return requested


def image_tokens_per_tile(cfg: BackboneConfig) -> int:
    """Image-context tokens per tile: the patch grid after pixel shuffle (256 for 448-px tiles, patch 14, ratio 0.5)."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    return int(grid * cfg.downsample_ratio) ** 2


def internvl_config(cfg: BackboneConfig, vocab_size: int, image_token_id: int) -> InternVLConfig:
    """An ``InternVLConfig`` for the architecture described in the recipe."""
    v, t = cfg.vision, cfg.text
    text = dict(
        model_type=t.model_type,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=vocab_size,
        rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if t.model_type == "llama":  # InternLM2.5 in HF form: no bias on q/k/v
        text["attention_bias"] = False
    vision = dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        norm_type=v.norm_type,
        use_qk_norm=v.use_qk_norm,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=image_tokens_per_tile(cfg),
        downsample_ratio=cfg.downsample_ratio,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def _check_checkpoint_matches(cfg: BackboneConfig, hf_config: InternVLConfig, path: str) -> None:
    """Refuse a checkpoint whose architecture differs from the recipe (a wrong folder, not a tweak)."""
    expected = {
        "text.hidden_size": (cfg.text.hidden_size, hf_config.text_config.hidden_size),
        "text.num_layers": (cfg.text.num_layers, hf_config.text_config.num_hidden_layers),
        "text.num_heads": (cfg.text.num_heads, hf_config.text_config.num_attention_heads),
        "text.num_kv_heads": (cfg.text.num_kv_heads, hf_config.text_config.num_key_value_heads),
        "vision.hidden_size": (cfg.vision.hidden_size, hf_config.vision_config.hidden_size),
        "vision.num_layers": (cfg.vision.num_layers, hf_config.vision_config.num_hidden_layers),
        "vision.image_size": (cfg.vision.image_size, tuple(hf_config.vision_config.image_size)[0]),
        "downsample_ratio": (cfg.downsample_ratio, hf_config.downsample_ratio),
    }
    diffs = [f"model.backbone.{k}: recipe {a}, checkpoint {b}" for k, (a, b) in expected.items() if a != b]
    if diffs:
        raise ConfigError(
            f"Config error at 'model.backbone.pretrained_path': the checkpoint in {path} does not match the recipe's "
            f"architecture ({'; '.join(diffs)}). Point the recipe at the right checkpoint or fix the architecture."
        )


def build_backbone(
    cfg: BackboneConfig,
    vocab_size: int,
    image_token_id: int,
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> InternVLForConditionalGeneration:
    """Load the checkpoint in ``cfg.pretrained_path`` or build a random model from the recipe's architecture.
    ``device``: load the weights straight onto it (None: the CPU, or ZeRO-3's partitions)."""
    if cfg.pretrained_path is not None:
        path = cfg.pretrained_path  # resolved when the config was loaded
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if not isinstance(hf_config, InternVLConfig):
            raise ConfigError(
                f"Config error at 'model.backbone.pretrained_path': {path} holds a '{hf_config.model_type}' model, "
                "not an HF-native InternVL ('internvl'). Convert it with transformers' InternVL converter."
            )
        _check_checkpoint_matches(cfg, hf_config, path)
        if hf_config.image_token_id != image_token_id:
            raise ConfigError(
                f"Config error at 'model.backbone.image_token': the checkpoint's image_token_id is "
                f"{hf_config.image_token_id} but the tokenizer maps '{cfg.image_token}' to {image_token_id}."
            )
        model = InternVLForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=False,
            device_map=None if device is None else {"": torch.device(device)},
        )
        log.info("loaded InternVL backbone from %s", path)
        return model
    hf_config = internvl_config(cfg, vocab_size, image_token_id)
    model = InternVLForConditionalGeneration._from_config(hf_config, attn_implementation=attn_implementation, dtype=dtype)
    for initialise in BACKBONE_INITIALISERS.values():  # experiments' starts of a random-weight backbone
        initialise(model, cfg)
    return model


def resize_for_tokenizer(model: InternVLForConditionalGeneration, tokenizer_size: int) -> None:
    """Grow input embeddings and LM head so every tokenizer id has a row (ZeRO-3 aware, via transformers).

    Checkpoints often pad their vocabulary; rows are only added, never removed. New rows are
    initialised from the mean and covariance of the old ones.
    """
    current = model.get_input_embeddings().num_embeddings
    if tokenizer_size > current:
        model.resize_token_embeddings(tokenizer_size, mean_resizing=True)
