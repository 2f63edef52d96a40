"""Segmentation head: the last hidden state at ``[SEG]`` -> 2-layer MLP -> SAM2 mask decoder.

Built from the official ``sam2`` package: its hydra model configs are instantiated exactly as
``sam2.build_sam.build_sam2`` does, and a released checkpoint (``{"model": state_dict}``) loads
strictly into the whole ``SAM2Base``. We then keep only what image segmentation needs: the
image encoder (frozen), ``no_mem_embed`` (frozen; SAM2 adds it to image-only features), the
prompt encoder and the mask decoder (trainable). The video memory modules are dropped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from .config import SegHeadConfig

# SAM2 normalises its input with the ImageNet statistics.
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


def _sam2_config_path(ref: str) -> Path:
    """A yaml path for 'sam2_tiny' (shipped here), 'configs/sam2.1/...' (the sam2 package) or a file."""
    path = Path(ref)  # a file path was resolved when the config was loaded
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = resources.files("perceptio_dist.recipes").joinpath(f"sam2/{ref}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    import sam2  # noqa: F401  (the package itself holds the official configs)

    packaged = resources.files("sam2").joinpath(ref)
    if packaged.is_file():
        return Path(str(packaged))
    raise ConfigError(
        f"Config error at 'model.seg_head.sam2_config': '{ref}' is not a SAM2 config shipped here "
        "(e.g. 'sam2_tiny'), in the sam2 package (e.g. 'configs/sam2.1/sam2.1_hiera_l.yaml'), or a yaml file."
    )


def sam2_model_config(ref: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(_sam2_config_path(ref)))
    OmegaConf.resolve(cfg)
    return cfg.model


def sam2_image_size(ref: str) -> int:
    """The square input size of a SAM2 config, without building the model."""
    return int(sam2_model_config(ref).image_size)


def build_sam2(ref: str, checkpoint: str | None = None, meta: bool = False) -> nn.Module:
    """Instantiate a whole ``SAM2Base`` from a config and optionally load a released checkpoint."""
    from hydra.utils import instantiate

    model_cfg = sam2_model_config(ref)
    ctx = contextlib.nullcontext()
    if meta:
        from accelerate import init_empty_weights

        ctx = init_empty_weights()
    with ctx:
        model = instantiate(model_cfg, _recursive_=True)
    if checkpoint is not None and not meta:
        path = checkpoint
        # weights_only: a checkpoint file must never be able to run code.
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        state = blob.get("model") if isinstance(blob, dict) else None
        if state is None:
            raise ConfigError(
                f"Config error at 'model.seg_head.sam2_checkpoint': {path} is not a SAM2 checkpoint "
                "(expected a dict with a 'model' state dict, as the official releases are)."
            )
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"Config error at 'model.seg_head.sam2_checkpoint': {path} does not match config '{ref}' "
                f"(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})."
            )
    return model


@dataclass
class SamImageFeatures:
    """SAM2 features of a batch of images, in the layout its mask decoder expects."""

    image_embed: torch.Tensor  # [B, C, h, w] (stride 16), no_mem_embed added
    high_res: list[torch.Tensor]  # [B, C/8, 4h, 4w] and [B, C/4, 2h, 2w], after the decoder's conv_s0/conv_s1

    def select(self, index: torch.Tensor) -> "SamImageFeatures":
        return SamImageFeatures(self.image_embed[index], [f[index] for f in self.high_res])


class SegHead(nn.Module):
    """``[SEG]`` hidden states -> mask logits, through SAM2's prompt encoder and mask decoder."""

    def __init__(self, sam2_model: nn.Module, llm_hidden_size: int, mlp_hidden_size: int | None = None):
        super().__init__()
        self.image_encoder = sam2_model.image_encoder
        self.prompt_encoder = sam2_model.sam_prompt_encoder
        self.mask_decoder = sam2_model.sam_mask_decoder
        self.no_mem_embed = sam2_model.no_mem_embed
        self.image_size = int(sam2_model.image_size)
        self.use_high_res_features = bool(sam2_model.use_high_res_features_in_sam)
        self.num_feature_levels = int(sam2_model.num_feature_levels)
        prompt_dim = self.prompt_encoder.embed_dim
        hidden = mlp_hidden_size or llm_hidden_size
        # LISA-style projection of the [SEG] state into one sparse prompt token.
        self.text_to_prompt = nn.Sequential(
            nn.Linear(llm_hidden_size, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, prompt_dim)
        )
        self.image_encoder.requires_grad_(False)
        self.no_mem_embed.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # SAM2 computes its random-Fourier positional encoding from fp32 coordinates (it runs under
        # autocast upstream); keep that projection matrix in fp32 whatever dtype the module is cast to.
        super()._apply(fn, recurse)
        pe = self.prompt_encoder.pe_layer
        pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        return self

    @property
    def prompt_dim(self) -> int:
        return self.prompt_encoder.embed_dim

    def frozen_modules(self) -> list[nn.Module]:
        return [self.image_encoder]

    def encode_images(self, images: torch.Tensor) -> SamImageFeatures:
        """SAM2 image features for ``images`` [B, 3, S, S] (normalised). The encoder is frozen: no graph."""
        with torch.no_grad():
            out = self.image_encoder(images)
        # SAM2's FPN upsamples in fp32 (it relies on autocast); bring every level to the module's dtype.
        dtype = self.no_mem_embed.dtype
        fpn = [f.to(dtype) for f in out["backbone_fpn"][-self.num_feature_levels:]]
        embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        high_res = []
        if self.use_high_res_features:
            # These convolutions belong to the (trainable) mask decoder, so they run with a graph.
            high_res = [self.mask_decoder.conv_s0(fpn[0]), self.mask_decoder.conv_s1(fpn[1])]
        return SamImageFeatures(embed, high_res)

    def forward(self, seg_hidden: torch.Tensor, features: SamImageFeatures) -> torch.Tensor:
        """Mask logits [S, 1, 4h, 4w] for ``seg_hidden`` [S, d]; ``features`` has one entry per row."""
        prompt = self.text_to_prompt(seg_hidden).unsqueeze(1)  # [S, 1, C]
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        count = prompt.shape[0]
        sparse = torch.cat([sparse.to(prompt.dtype).expand(count, -1, -1), prompt], dim=1)
        dense = dense.expand(count, -1, -1, -1)
        masks, _iou, _tokens, _obj = self.mask_decoder(
            image_embeddings=features.image_embed,
            image_pe=self.prompt_encoder.get_dense_pe().to(prompt.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(prompt.dtype),
            multimask_output=False,
            repeat_image=False,
            high_res_features=features.high_res or None,
        )
        return masks


def build_seg_head(cfg: SegHeadConfig, llm_hidden_size: int, meta: bool = False) -> SegHead:
    sam2_model = build_sam2(cfg.sam2_config, cfg.sam2_checkpoint, meta=meta)
    ctx = contextlib.nullcontext()
    if meta:
        from accelerate import init_empty_weights

        ctx = init_empty_weights()
    with ctx:
        return SegHead(sam2_model, llm_hidden_size, cfg.mlp_hidden_size)
