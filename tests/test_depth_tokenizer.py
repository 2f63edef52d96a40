"""Depth tokenizer: EMA codebook with dead-code restarts, training (resume, two ranks), the metrics on
hand-made maps, the real RGB-D frames, the evaluation report and its train/eval separation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.model.config import DepthVQVAEConfig
from perceptio_dist.eval.depth_metrics import (
    abs_rel,
    align_to_depth,
    delta1,
    ordering_accuracy,
    sample_point_sets,
)
from perceptio_dist.eval.rgbd import DEFAULT_RGBD_DIR, Frame, load_middlebury, load_nyu, load_sun, load_tum
from perceptio_dist.model.depth_vqvae import DepthVQVAE, EMAVectorQuantizer, load_depth_vqvae

from .conftest import ROOT, launcher_variables_restored, run_ranks

TINY = ["tokens.num_depth_codes=16", "tokens.depth_grid=4", "depth_vqvae.input_size=16", "depth_vqvae.code_dim=8",
        "depth_vqvae.base_channels=4", "depth_vqvae.max_channels=8", "batch_size=8", "warmup_steps=2",
        "log_every=1", "progress_bar=false", "restart_every=5"]


# ------------------------------------------------------------------------------- quantizer


def test_dead_code_restart_reseeds_only_unused_codes():
    torch.manual_seed(0)
    quant = EMAVectorQuantizer(num_codes=4, code_dim=2, decay=0.9)
    quant.ema_cluster_size.copy_(torch.tensor([5.0, 0.1, 3.0, 0.5]))
    before = quant.codebook.clone()
    candidates = torch.tensor([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]])
    restarted = quant.restart_dead_codes(candidates, threshold=1.0)
    assert restarted == 2
    assert torch.equal(quant.codebook[[0, 2]], before[[0, 2]])  # alive codes untouched
    for code in (1, 3):  # dead ones now sit exactly on candidate vectors, with a fresh EMA count
        assert any(torch.equal(quant.codebook[code], c) for c in candidates)
        assert quant.ema_cluster_size[code] == 1.0
        torch.testing.assert_close(quant.ema_code_sum[code], quant.codebook[code] * 1.0)
    assert quant.restart_dead_codes(candidates, threshold=0.5) == 0


def test_encode_decode_dtypes():
    vq = DepthVQVAE(DepthVQVAEConfig(input_size=16, code_dim=4, base_channels=2, max_channels=4), 16, 4).eval()
    codes = vq.encode(torch.rand(2, 1, 16, 16))
    assert codes.dtype == torch.int64 and codes.shape == (2, 16)
    out = vq.decode(codes)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 16, 16)
    onehot = torch.nn.functional.one_hot(codes, 16).float()
    torch.testing.assert_close(vq.soft_decode(onehot), out)


# --------------------------------------------------------------------------------- metrics


def test_alignment_recovers_scale_and_shift_and_metrics_by_hand():
    depth = np.array([[1.0, 2.0], [4.0, 5.0]], np.float32)
    valid = np.ones_like(depth, bool)
    pred = 2.0 * (1 / depth) + 3.0  # an affine function of inverse depth
    np.testing.assert_allclose(align_to_depth(pred, depth, valid), depth, rtol=1e-5)
    guess = np.array([[1.0, 2.5], [4.0, 4.0]], np.float32)
    assert abs_rel(guess, depth, valid) == pytest.approx((0 + 0.5 / 2 + 0 + 1 / 5) / 4)
    assert delta1(guess, depth, valid) == pytest.approx(2 / 4)  # 2.5/2 and 5/4 are 1.25: not < 1.25


def test_ordering_accuracy_on_hand_made_maps():
    depth = np.ones((60, 90), np.float32)
    depth[:, 30:60] = 2.0
    depth[:, 60:] = 4.0  # three bands: near, middle, far
    valid = np.ones_like(depth, bool)
    rng = np.random.default_rng(0)
    sets = sample_point_sets(depth, valid, 3, 50, rng, min_distance=20, min_ratio=0.10)
    assert sets.shape == (50, 3, 2)
    for s in sets:  # the rules: 20 px apart, depths pairwise 10% apart (so one point per band)
        d = np.hypot(*(s[:, None] - s[None]).transpose(2, 0, 1))
        assert d[np.triu_indices(3, 1)].min() >= 20
        assert sorted(depth[s[:, 0], s[:, 1]].tolist()) == [1.0, 2.0, 4.0]
    assert ordering_accuracy(1 / depth, depth, sets) == 1.0
    assert ordering_accuracy(depth, depth, sets) == 0.0  # inverted prediction picks the farthest
    truth_first = np.mean(np.argmin(depth[sets[..., 0], sets[..., 1]], 1) == 0)
    assert ordering_accuracy(np.zeros_like(depth), depth, sets) == truth_first  # ties pick the first point
    with pytest.raises(ValueError, match="meet the rules"):
        sample_point_sets(np.ones((30, 30), np.float32), np.ones((30, 30), bool), 2, 5, rng, max_tries=500)


# ------------------------------------------------------------------------------ RGB-D data


@pytest.mark.skipif(not DEFAULT_RGBD_DIR.exists(), reason="RGB-D frames not found at ../shared/data/rgbd")
@pytest.mark.parametrize("loader, low, high, valid_fraction", [
    (load_tum, 1.46, 9.33, 0.81), (load_sun, 1.06, 9.87, 0.82), (load_nyu, 1.39, 6.69, 0.93),
])
def test_shared_rgbd_frames_decode_as_their_readme_says(loader, low, high, valid_fraction):
    frame = loader(DEFAULT_RGBD_DIR)
    d = frame.depth[frame.valid]
    assert frame.rgb.shape == (480, 640, 3) and frame.depth.shape == (480, 640)
    assert d.min() == pytest.approx(low, abs=0.01) and d.max() == pytest.approx(high, abs=0.01)
    assert frame.valid.mean() == pytest.approx(valid_fraction, abs=0.01)


def test_middlebury_frame_from_scikit_image():
    frame = load_middlebury()
    d = frame.depth[frame.valid]
    assert frame.rgb.shape[:2] == frame.depth.shape == (500, 741)
    assert 0.9 < frame.valid.mean() < 0.95 and 1.0 < d.min() < d.max() < 30.0  # metres, from disparity
    assert frame.files and all(p.exists() for p in frame.files)


# -------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from perceptio_dist.preprocess.scenes.folders import write_scenes
    from perceptio_dist.depth_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("vqvae")
    write_scenes(root / "scenes", 8, width=96, height=72, progress=False)
    out = root / "tok"
    with launcher_variables_restored():  # in-process training joins a 1-rank group and sets RANK, MASTER_PORT
        first = train_tokenizer("vqvae_tiny", [f"output_dir={out}", f"data.scenes={root / 'scenes'}", "steps=12",
                                               "save_every=6", *TINY])
    return root, out, first


def test_training_writes_a_loadable_tokenizer_and_metrics(trained):
    _, out, final = trained
    from perceptio_dist.train.vqvae_trainer import load_tokenizer, training_hashes

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        assert 0 < m["usage"] <= 1 and 1 <= m["perplexity"] <= 16 and m["recon_l1"] > 0
    assert metrics[-1]["recon_l1"] < metrics[0]["recon_l1"]
    model, meta = load_tokenizer(out)
    assert meta["num_codes"] == 16 and meta["grid"] == 4 and meta["training_maps"] == 8
    assert len(training_hashes(out)) == 16  # depth.npy and rgb.png of 8 scenes
    assert (out / "checkpoints" / "step_0000006" / "state.json").exists()
    with pytest.raises(ConfigError, match="another architecture.*num_codes: recipe 32, tokenizer 16"):
        load_depth_vqvae(DepthVQVAEConfig(**meta["depth_vqvae"]), 32, 4, str(out / "tokenizer.safetensors"))
    with pytest.raises(ConfigError, match="another architecture.*decoder: recipe cell, tokenizer conv"):
        load_depth_vqvae(DepthVQVAEConfig(**{**meta["depth_vqvae"], "decoder": "cell"}), 16, 4,
                         str(out / "tokenizer.safetensors"))


def test_a_tokenizer_written_before_the_decoder_field_loads_as_conv(trained, tmp_path):
    """tokenizer.json files from before depth_vqvae.decoder existed name no decoder: they were conv decoders."""
    _, out, _ = trained
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["depth_vqvae"].pop("decoder") == "conv"
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    shutil.copy(out / "tokenizer.safetensors", tmp_path / "tokenizer.safetensors")
    weights = str(tmp_path / "tokenizer.safetensors")
    model = load_depth_vqvae(DepthVQVAEConfig(**meta["depth_vqvae"]), 16, 4, weights)
    assert type(model.decoder).__name__ == "DepthDecoder"
    with pytest.raises(ConfigError, match="decoder: recipe cell, tokenizer conv"):
        load_depth_vqvae(DepthVQVAEConfig(**{**meta["depth_vqvae"], "decoder": "cell"}), 16, 4, weights)


def test_training_resumes_from_its_last_checkpoint(trained, tmp_path):
    root, out, _ = trained
    import shutil

    from perceptio_dist.depth_tokenizer import train_tokenizer

    copy = tmp_path / "tok"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000012")
    (copy / "metrics.jsonl").write_text("")
    train_tokenizer("vqvae_tiny", [f"output_dir={copy}", f"data.scenes={root / 'scenes'}", "steps=12", *TINY])
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7, 13))  # picked up after step 6
    original = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][6:]
    resumed = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(original, resumed):  # same batches, same weights: the same run
        assert a["recon_l1"] == pytest.approx(b["recon_l1"], rel=1e-5)


def test_two_rank_data_parallel_training(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "ddp"
    run_ranks(2, ["train", "--config", "vqvae_tiny", f"output_dir={out}", f"data.scenes={root / 'scenes'}",
                  "steps=6", *TINY], timeout=300, module="perceptio_dist.vqvae")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and (out / "tokenizer.safetensors").exists()


def test_training_refuses_excluded_files(trained, tmp_path):
    root, _, _ = trained
    from perceptio_dist.depth_tokenizer import train_tokenizer

    leaked = next((root / "scenes").iterdir()) / "rgb.png"
    with pytest.raises(ConfigError, match="excluded evaluation files"):
        train_tokenizer("vqvae_tiny", [f"output_dir={tmp_path}", f"data.scenes={root / 'scenes'}", "steps=3",
                                       f"excluded_files=[{leaked}]", *TINY])


# ------------------------------------------------------------------------------ evaluation


def test_evaluation_report_and_train_eval_separation(trained, tmp_path):
    _, out, _ = trained
    from perceptio_dist.eval.tokenizer_report import evaluate, write_report
    from perceptio_dist.train.vqvae_trainer import load_tokenizer

    model, meta = load_tokenizer(out)
    frame = load_middlebury()
    results = evaluate(model, [frame], tmp_path, num_sets=40)
    scores = results["frames"]["Middlebury"]
    assert set(scores) == {"tokenizer", "constant", "vertical gradient"}
    assert scores["constant"]["order_2"] == pytest.approx(0.5, abs=0.15)  # ties: chance
    assert (tmp_path / "Middlebury.png").stat().st_size > 10_000
    report = write_report(results, tmp_path, "test", meta).read_text()
    assert "| tokenizer |" in report and "![Middlebury](Middlebury.png)" in report
    with pytest.raises(RuntimeError, match="was in the tokenizer's training data"):
        evaluate(model, [frame], tmp_path, num_sets=5, training_hashes=frame.file_hashes())
    fake = Frame("fake", frame.rgb, frame.depth, frame.valid, [Path(ROOT / "README.md")])
    assert fake.file_hashes() and not (fake.file_hashes() & frame.file_hashes())
