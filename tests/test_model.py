"""PerceptioModel: spatial tokens and resizing, forward outputs, loading every part from local paths,
and the 8B recipe's parameter count on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.data.training_data import build_loader
from perceptio_dist.model.perceptio import build_perceptio, build_perceptio_meta, parameter_report
from perceptio_dist.model.seg_head import build_sam2
from perceptio_dist.model.spatial_tokens import spatial_token_strings
from perceptio_dist.model.tokenizer import load_tokenizer


def tiny_batch(cfg, tokenizer, model, size):
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=size))
    loader = build_loader(cfg, tokenizer, model.token_ids, rank=0, world_size=1)
    return next(iter(loader))


def test_spatial_tokens_added_contiguously_and_rows_trainable(tiny_cfg):
    tokenizer = load_tokenizer(tiny_cfg.model.backbone)
    base = len(tokenizer)
    torch.manual_seed(0)
    model = build_perceptio(tiny_cfg.model, tokenizer)
    ids = model.token_ids
    k = tiny_cfg.model.tokens.num_depth_codes
    assert len(tokenizer) == base + 3 + k
    assert model.base_vocab_size == base
    assert tokenizer.convert_ids_to_tokens(list(range(ids.code_start, ids.code_end))) == [
        f"<DEPTH_{i}>" for i in range(k)]
    assert tokenizer.convert_ids_to_tokens([ids.seg, ids.depth_start, ids.depth_end]) == [
        "[SEG]", "<DEPTH_START>", "<DEPTH_END>"]
    assert model.backbone.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.lm_head.weight.shape[0] == len(tokenizer)
    assert model.backbone.get_input_embeddings().weight.requires_grad and model.lm_head.weight.requires_grad
    # "[SEG]" in text is one token, never split into characters
    assert tokenizer("x [SEG] y", add_special_tokens=False)["input_ids"].count(ids.seg) == 1
    # adding again is idempotent, and a second build from the same (now extended) tokenizer is the same model:
    # its base vocabulary leaves the spatial tokens out, and the same seed gives the same weights
    torch.manual_seed(0)
    again = build_perceptio(tiny_cfg.model, tokenizer)
    assert again.token_ids == ids and again.base_vocab_size == base
    first, second = model.state_dict(), again.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_forward_outputs_and_frozen_parts(tiny_cfg, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_perceptio(tiny_cfg.model, tiny_tokenizer).train()
    assert not model.depth_vqvae.training and not model.seg_head.image_encoder.training
    assert not any(p.requires_grad for p in model.depth_vqvae.parameters())
    batch = tiny_batch(tiny_cfg, tiny_tokenizer, model, 6)
    out = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.sam_images)
    b, t = batch.input_ids.shape
    assert out.hidden_states.shape == (b, t, tiny_cfg.model.backbone.text.hidden_size)
    num_seg = int((batch.input_ids == model.token_ids.seg).sum())
    assert out.num_seg == num_seg == batch.seg_masks.shape[0] > 0
    assert out.mask_logits.shape == (num_seg, 1, 32, 32)
    # no [SEG] at all: one dummy prompt keeps the SAM2 branch running
    no_seg = batch.input_ids.masked_fill(batch.input_ids == model.token_ids.seg, tiny_tokenizer.pad_token_id)
    out = model(no_seg, batch.attention_mask, batch.pixel_values, batch.sam_images)
    assert out.num_seg == 0 and out.mask_logits.shape == (1, 1, 32, 32)


def test_every_part_loads_from_local_paths(tiny_cfg, tiny_tokenizer, tmp_path):
    """Save tiny random InternVL (+ tokenizer), SAM2 and VQ-VAE weights; the recipe pointing at them reproduces them."""
    torch.manual_seed(0)
    original = build_perceptio(tiny_cfg.model, tiny_tokenizer).eval()
    original.backbone.save_pretrained(tmp_path / "internvl")
    tiny_tokenizer.save_pretrained(tmp_path / "internvl")
    torch.save({"model": build_sam2("sam2_tiny").state_dict()}, tmp_path / "sam2.pt")
    save_file(original.depth_vqvae.state_dict(), str(tmp_path / "vqvae.safetensors"))
    cfg = load_config("tiny_cpu", [
        f"data.shards={tiny_cfg.data.shards}",
        f"model.backbone.pretrained_path={tmp_path / 'internvl'}", "model.backbone.tokenizer=pretrained",
        f"model.seg_head.sam2_checkpoint={tmp_path / 'sam2.pt'}",
        f"model.depth_vqvae.checkpoint={tmp_path / 'vqvae.safetensors'}",
    ])
    torch.manual_seed(999)  # different random init everywhere: only the files can make the models agree
    tokenizer = load_tokenizer(cfg.model.backbone)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    loaded = build_perceptio(cfg.model, tokenizer).eval()
    assert loaded.token_ids == original.token_ids
    for name, value in original.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[name], value, msg=name)
    for name, value in original.depth_vqvae.state_dict().items():
        torch.testing.assert_close(loaded.depth_vqvae.state_dict()[name], value, msg=name)
    batch = tiny_batch(cfg, tokenizer, loaded, 2)
    with torch.no_grad():
        a = original.backbone.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).last_hidden_state
        b = loaded.backbone.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).last_hidden_state
    torch.testing.assert_close(a, b)


def test_checkpoint_with_another_architecture_is_refused(tiny_cfg, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    build_perceptio(tiny_cfg.model, tiny_tokenizer).backbone.save_pretrained(tmp_path / "internvl")
    tiny_tokenizer.save_pretrained(tmp_path / "internvl")
    cfg = load_config("tiny_cpu", [f"model.backbone.pretrained_path={tmp_path / 'internvl'}",
                                   "model.backbone.tokenizer=pretrained", "model.backbone.text.num_layers=3",
                                   "model.depth_vqvae.checkpoint=null"])
    with pytest.raises(ConfigError, match=r"text.num_layers: recipe 3, checkpoint 2"):
        build_perceptio(cfg.model, load_tokenizer(cfg.model.backbone))


def test_8b_recipe_builds_on_meta_and_counts_about_8b(capsys):
    cfg = load_config("perceptio_8b")
    model = build_perceptio_meta(cfg.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    report = parameter_report(model)
    print()
    for name, count in report.items():
        print(f"  {name:30s} {count:>15,}")
    spatial = len(spatial_token_strings(cfg.model.tokens))
    assert report["of_which_spatial_token_rows"] == spatial * 4096 * 2  # untied: embedding and LM head rows
    internvl_2_5_8b = report["backbone_total"] - report["of_which_spatial_token_rows"]
    # InternViT-300M (303.9M) + projector (33.6M) + InternLM2.5-7B with InternVL's 92,553-token vocab (7,737.8M)
    assert internvl_2_5_8b == pytest.approx(8.075e9, rel=2e-3)
    assert report["vision_tower"] == pytest.approx(304e6, rel=5e-3)
    assert report["sam2_image_encoder"] == pytest.approx(212.7e6, rel=5e-3)  # SAM2.1 Hiera-L trunk + FPN neck
    assert report["sam2_mask_decoder"] == pytest.approx(4.2e6, rel=1e-2)
    assert report["seg_mlp"] == 4096 * 4096 + 4096 + 4096 * 256 + 256
    assert report["total"] > report["backbone_total"] > 8.0e9


def test_meta_build_needs_a_vocabulary_size():
    cfg = load_config("perceptio_8b", ["model.backbone.text.vocab_size=null"])
    with pytest.raises(ValueError, match="vocab_size"):
        build_perceptio_meta(dataclasses.replace(cfg.model))


def test_sample_geometry_from_the_config_is_the_built_models(tiny_cfg, tiny_tokenizer):
    """The data side reads the geometry from the config (model/geometry.py); it must be what the model uses."""
    from perceptio_dist.model.geometry import sample_geometry

    model = build_perceptio(tiny_cfg.model, tiny_tokenizer)
    geo = sample_geometry(tiny_cfg.model)
    assert geo.image_tokens_per_tile == model.backbone.config.image_seq_length
    assert geo.sam_size == model.seg_head.image_size
    assert geo.tile_size == model.backbone.config.vision_config.image_size[0]
    assert (geo.num_depth_tokens, geo.num_codes) == (model.token_ids.num_depth_tokens, model.token_ids.num_codes)
    big = load_config("perceptio_8b").model
    assert sample_geometry(big).image_tokens_per_tile == 256 and sample_geometry(big).sam_size == 1024
