"""SAM2 seg head built from the official sam2 package: configs, frozen encoder, checkpoint loading, dtypes."""

from __future__ import annotations

import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.model.config import SegHeadConfig
from perceptio_dist.model.seg_head import build_sam2, build_seg_head, sam2_image_size


def test_official_and_shipped_configs_resolve():
    assert sam2_image_size("configs/sam2.1/sam2.1_hiera_l.yaml") == 1024
    assert sam2_image_size("sam2_tiny") == 128
    with pytest.raises(ConfigError, match="model.seg_head.sam2_config"):
        sam2_image_size("no_such_config")


def test_frozen_encoder_trainable_decoder_and_shapes():
    torch.manual_seed(0)
    head = build_seg_head(SegHeadConfig(sam2_config="sam2_tiny"), llm_hidden_size=24)
    assert not any(p.requires_grad for p in head.image_encoder.parameters())
    assert not head.no_mem_embed.requires_grad
    assert all(p.requires_grad for p in head.text_to_prompt.parameters())
    assert any(p.requires_grad for p in head.mask_decoder.parameters())
    images = torch.randn(2, 3, 128, 128)
    features = head.encode_images(images)
    assert features.image_embed.shape == (2, 32, 8, 8)
    hidden = torch.randn(3, 24, requires_grad=True)
    logits = head(hidden, features.select(torch.tensor([0, 1, 1])))
    assert logits.shape == (3, 1, 32, 32)
    logits.sum().backward()
    assert hidden.grad.abs().sum() > 0  # the [SEG] state steers the mask
    assert all(p.grad is None for p in head.image_encoder.parameters())


def test_released_checkpoint_format_loads(tmp_path):
    torch.manual_seed(0)
    sam2 = build_sam2("sam2_tiny")
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": sam2.state_dict()}, path)  # the official release layout
    torch.manual_seed(123)  # different random init: only the checkpoint can make them agree
    head = build_seg_head(SegHeadConfig(sam2_config="sam2_tiny", sam2_checkpoint=str(path)), llm_hidden_size=8)
    for name, value in sam2.image_encoder.state_dict().items():
        torch.testing.assert_close(head.image_encoder.state_dict()[name], value)
    for name, value in sam2.sam_mask_decoder.state_dict().items():
        torch.testing.assert_close(head.mask_decoder.state_dict()[name], value)
    torch.save({"weights": sam2.state_dict()}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="not a SAM2 checkpoint"):
        build_seg_head(SegHeadConfig(sam2_config="sam2_tiny", sam2_checkpoint=str(tmp_path / "wrong.pt")), 8)
    state = sam2.state_dict()
    state.pop(next(iter(state)))
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="does not match config"):
        build_seg_head(SegHeadConfig(sam2_config="sam2_tiny", sam2_checkpoint=str(tmp_path / "partial.pt")), 8)


def test_bf16_cast_keeps_positional_encoding_fp32_and_runs():
    torch.manual_seed(0)
    head = build_seg_head(SegHeadConfig(sam2_config="sam2_tiny"), llm_hidden_size=16).to(torch.bfloat16)
    assert head.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert head.text_to_prompt[0].weight.dtype == torch.bfloat16
    features = head.encode_images(torch.randn(1, 3, 128, 128, dtype=torch.bfloat16))
    logits = head(torch.randn(1, 16, dtype=torch.bfloat16), features)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
