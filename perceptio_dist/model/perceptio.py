"""PerceptioModel: InternVL backbone + [SEG]-prompted SAM2 decoder + frozen depth VQ-VAE.

``forward`` returns what the objective needs: the LLM's last hidden states and the mask
logits of every ``[SEG]`` in the batch. It never computes the full LM-head logits; the
objective works from the hidden states and the LM-head weight (see losses/).

ZeRO-3 rule (DESIGN.md section 2): every rank runs every parameterised branch on every step.
A batch without ``[SEG]`` still runs the SAM2 encoder and decoder on one dummy prompt whose
result the objective multiplies by zero, so parameter gathers stay in step across ranks.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

from ..registry import CODE_ROW_INITIALISERS
from .config import ModelConfig
from .backbone import build_backbone, choose_attention_implementation, internvl_config, resize_for_tokenizer
from .depth_vqvae import DepthVQVAE, load_depth_vqvae
from .seg_head import SegHead, build_seg_head
from .spatial_tokens import SpatialTokenIds, add_spatial_tokens, spatial_token_strings, spatial_tokens_known


class PerceptioOutput(NamedTuple):  # a tuple, so DeepSpeed's ZeRO-3 hooks see the tensors
    hidden_states: torch.Tensor  # [B, T, d], last layer
    mask_logits: torch.Tensor  # [S, 1, h, w]; one dummy row when num_seg == 0
    num_seg: int  # [SEG] tokens in the batch, in row-major order of input_ids


class PerceptioModel(nn.Module):
    def __init__(
        self,
        backbone: InternVLForConditionalGeneration,
        seg_head: SegHead,
        depth_vqvae: DepthVQVAE,
        token_ids: SpatialTokenIds,
        base_vocab_size: int,
        freeze_vision_tower: bool = False,
        freeze_language_model: bool = False,
        flatten_packed_rows: bool = False,
    ):
        super().__init__()
        self.flatten_packed_rows = flatten_packed_rows
        self.backbone = backbone
        self.seg_head = seg_head
        self.depth_vqvae = depth_vqvae
        self.token_ids = token_ids
        self.base_vocab_size = base_vocab_size  # vocabulary before the spatial tokens were added
        self.depth_vqvae.requires_grad_(False)
        if freeze_vision_tower:
            self.backbone.model.vision_tower.requires_grad_(False)
        if freeze_language_model:
            lm = self.backbone.model.language_model
            lm.layers.requires_grad_(False)
            lm.norm.requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptioModel":
        super().train(mode)
        keep_frozen_parts_in_eval(self.seg_head, self.depth_vqvae)
        return self

    @property
    def attn_implementation(self) -> str:
        return self.backbone.config._attn_implementation

    @property
    def lm_head(self) -> nn.Linear:
        return self.backbone.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        sam_images: torch.Tensor,
        sample_index: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> PerceptioOutput:
        """``sample_index`` [B, T]: each token's sample (None: one sample per row). ``position_ids`` given: a packed
        batch (data/packing.py); transformers then builds the block-diagonal causal mask from the restarting
        positions, which it does only without a 2-D attention mask. With ``flatten_packed_rows`` the rows run as one
        row (row-major, so image tokens keep their order): flash-attention-2 reads restarting positions as sample
        boundaries (its varlen kernel) only in a batch of one row, and would otherwise let samples of a row attend
        to each other. Row padding restarts its positions too, so it stays a block of its own."""
        if sample_index is None:
            sample_index = rows_as_samples(attention_mask)
        packed = position_ids is not None
        rows, width = input_ids.shape
        flatten = packed and self.flatten_packed_rows and rows > 1
        out = self.backbone.model(
            input_ids=input_ids.reshape(1, -1) if flatten else input_ids,
            attention_mask=None if packed else attention_mask,
            position_ids=position_ids.reshape(1, -1) if flatten else position_ids,
            pixel_values=pixel_values.to(self.backbone.dtype),
            use_cache=False,
        )
        hidden = out.last_hidden_state.reshape(rows, width, -1) if flatten else out.last_hidden_state
        mask_logits, num_seg = self.segment(hidden, input_ids, sample_index, sam_images)
        return PerceptioOutput(hidden_states=hidden, mask_logits=mask_logits, num_seg=num_seg)

    def segment(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, sample_index: torch.Tensor, sam_images: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        return segment_seg_tokens(self.seg_head, self.token_ids.seg, hidden, input_ids, sample_index, sam_images)


def rows_as_samples(attention_mask: torch.Tensor) -> torch.Tensor:
    """The sample index of a padded batch: row i is sample i, padding is -1."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)[:, None].expand_as(attention_mask)
    return torch.where(attention_mask.bool(), rows, torch.full_like(rows, -1))


def keep_frozen_parts_in_eval(seg_head: SegHead, depth_vqvae: DepthVQVAE) -> None:
    """Frozen parts stay in eval mode whatever mode their owner is put in (no EMA updates, no dropout)."""
    depth_vqvae.eval()
    for module in seg_head.frozen_modules():
        module.eval()


def segment_seg_tokens(seg_head: SegHead, seg_id: int, hidden: torch.Tensor, input_ids: torch.Tensor,
                       sample_index: torch.Tensor, sam_images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mask logits of every [SEG] (the hidden state at the [SEG] input position prompts SAM2 with its sample's image),
    and their number. ``sample_index`` [B, T]: each token's sample, -1 for padding (packed or not).

    A function of the parts, so the last pipeline stage runs exactly this without the whole model.
    """
    is_seg = (input_ids == seg_id) & (sample_index >= 0)
    rows, cols = is_seg.nonzero(as_tuple=True)
    num_seg = int(rows.numel())
    if num_seg == 0:
        # Dummy prompt: same modules, same order, result multiplied by zero by the objective.
        owners = torch.zeros(1, dtype=torch.long, device=hidden.device)
        seg_hidden = hidden[0, :1] * 0
    else:
        owners = sample_index[rows, cols]
        seg_hidden = hidden[rows, cols]
    images, image_index = torch.unique(owners, return_inverse=True)
    features = seg_head.encode_images(sam_images[images].to(seg_hidden.dtype))
    return seg_head(seg_hidden, features.select(image_index)), num_seg


# ------------------------------------------------------------------------ building


def build_perceptio(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32, seed: int = 0,
    device: torch.device | str | None = None,
) -> PerceptioModel:
    """The model for training or inference. ``tokenizer`` gains the spatial tokens (idempotent).

    Every part is in ``dtype`` (the backbone is created in it, possibly already partitioned by
    ZeRO-3; the SAM2 parts and the VQ-VAE are cast before anything partitions them). ``device`` (inference): every
    part is created on it, so an 8B model never passes through host memory; None: the CPU, for the training engine
    to place (parallel/placement.py).
    """
    device = None if device is None else torch.device(device)
    with device if device is not None else contextlib.nullcontext():
        return _build_perceptio(cfg, tokenizer, dtype, seed, device)


def _build_perceptio(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int,
                     device: torch.device | None) -> PerceptioModel:
    b = cfg.backbone
    # The vocabulary before the spatial tokens: a tokenizer that already has them (a second build, an export's
    # tokenizer) holds them at its end.
    known = tokenizer.get_vocab()
    base_vocab = b.text.vocab_size or len(tokenizer) - sum(s in known for s in spatial_token_strings(cfg.tokens))
    # A checkpoint whose tokenizer already knows the spatial tokens (an export, a fine-tune of a Perceptio run)
    # holds trained rows for them: initialisations of those rows apply only to rows this build creates.
    fresh_spatial_rows = b.pretrained_path is None or not spatial_tokens_known(tokenizer, cfg.tokens)
    token_ids = add_spatial_tokens(tokenizer, cfg.tokens)
    attn = choose_attention_implementation(b.attn_implementation, device)
    image_token_id = tokenizer.convert_tokens_to_ids(b.image_token)
    backbone = build_backbone(b, base_vocab, image_token_id, attn, dtype, device)
    resize_for_tokenizer(backbone, len(tokenizer))
    # Each part draws its random initialisation from its own seed, so it does not depend on what was built
    # before it (DeepSpeed's partitioned construction consumes random numbers by rank count): frozen parts
    # without a checkpoint come out identical on any number of ranks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        seg_head = build_seg_head(cfg.seg_head, b.text.hidden_size).to(dtype)
    if cfg.depth_vqvae.checkpoint:
        vqvae = load_depth_vqvae(cfg.depth_vqvae, cfg.tokens.num_depth_codes, cfg.tokens.depth_grid,
                                 cfg.depth_vqvae.checkpoint)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            vqvae = DepthVQVAE(cfg.depth_vqvae, cfg.tokens.num_depth_codes, cfg.tokens.depth_grid)
    vqvae = vqvae.to(dtype)
    if fresh_spatial_rows:  # experiments' starts of the new spatial-token rows (a checkpoint's rows win)
        for initialise in CODE_ROW_INITIALISERS.values():
            initialise(backbone, vqvae, token_ids, cfg, seed)
    flatten = attn == "flash_attention_2" if b.flatten_packed_rows is None else b.flatten_packed_rows
    model = PerceptioModel(
        backbone, seg_head, vqvae, token_ids, base_vocab, b.freeze_vision_tower, b.freeze_language_model, flatten
    )
    if cfg.lora.rank:
        from .lora import apply_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 4)
            apply_lora(model.backbone, cfg.lora, token_ids.first)
    return model


def build_perceptio_meta(cfg: ModelConfig) -> PerceptioModel:
    """The full-size model on the meta device (no memory, no weights, no tokenizer): for planning and counting.

    The vocabulary is the recipe's base vocabulary plus the spatial tokens, as after resizing.
    """
    from accelerate import init_empty_weights

    b = cfg.backbone
    if b.text.vocab_size is None:
        raise ValueError("a meta build needs model.backbone.text.vocab_size (no tokenizer is loaded)")
    num_spatial = len(spatial_token_strings(cfg.tokens))
    token_ids = SpatialTokenIds(
        seg=b.text.vocab_size, depth_start=b.text.vocab_size + 1, depth_end=b.text.vocab_size + 2,
        code_start=b.text.vocab_size + 3, num_codes=cfg.tokens.num_depth_codes,
        num_depth_tokens=cfg.tokens.num_depth_tokens,
    )
    hf_config = internvl_config(b, b.text.vocab_size + num_spatial, image_token_id=0)
    with init_empty_weights():
        backbone = InternVLForConditionalGeneration(hf_config)
    seg_head = build_seg_head(cfg.seg_head, b.text.hidden_size, meta=True)
    with init_empty_weights():
        vqvae = DepthVQVAE(cfg.depth_vqvae, cfg.tokens.num_depth_codes, cfg.tokens.depth_grid)
    model = PerceptioModel(backbone, seg_head, vqvae, token_ids, b.text.vocab_size, b.freeze_vision_tower,
                           b.freeze_language_model)
    if cfg.lora.rank:
        from .lora import apply_lora

        with init_empty_weights():
            apply_lora(model.backbone, cfg.lora, token_ids.first)
    return model


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitioned parameters report their full size here


def parameter_report(model: PerceptioModel) -> dict[str, int]:
    """Parameter counts by component (full sizes, also under ZeRO-3 and on the meta device)."""

    def count(module: nn.Module) -> int:
        return sum(_numel(p) for p in module.parameters())

    bb = model.backbone
    inner = bb.model
    embed = inner.language_model.embed_tokens
    hidden = embed.embedding_dim
    vocab = embed.num_embeddings
    tied = bb.lm_head.weight is embed.weight
    spatial_rows = (vocab - model.base_vocab_size) * hidden * (1 if tied else 2)
    report = {
        "vision_tower": count(inner.vision_tower),
        "projector": count(inner.multi_modal_projector),
        "language_model": count(inner.language_model),
        "lm_head": 0 if tied else _numel(bb.lm_head.weight),
        "of_which_spatial_token_rows": spatial_rows,
        "sam2_image_encoder": count(model.seg_head.image_encoder) + _numel(model.seg_head.no_mem_embed),
        "sam2_prompt_encoder": count(model.seg_head.prompt_encoder),
        "sam2_mask_decoder": count(model.seg_head.mask_decoder),
        "seg_mlp": count(model.seg_head.text_to_prompt),
        "depth_vqvae": count(model.depth_vqvae) + model.depth_vqvae.quantizer.codebook.numel(),
    }
    report["backbone_total"] = report["vision_tower"] + report["projector"] + report["language_model"] + report["lm_head"]
    report["total"] = sum(v for k, v in report.items() if k not in ("of_which_spatial_token_rows", "backbone_total"))
    report["trainable"] = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return report
