"""Every term of the objective against values computed by hand (plain Python math), plus gradcheck
of the soft-merge reconstruction through the real VQ-VAE decoder."""

from __future__ import annotations

import math

import pytest
import torch

from perceptio_dist.losses.config import ObjectiveConfig
from perceptio_dist.model.config import DepthVQVAEConfig
from perceptio_dist.losses.lm_head_terms import fused_lm_head_terms, reference_lm_head_terms
from perceptio_dist.losses.mask_loss import mask_loss
from perceptio_dist.losses.objective import IGNORE_INDEX, PerceptioObjective, find_depth_blocks
from perceptio_dist.model.depth_vqvae import DepthVQVAE
from perceptio_dist.model.spatial_tokens import SpatialTokenIds

# A 12-token vocabulary: 0..5 text, 6 [SEG], 7 <DEPTH_START>, 8 <DEPTH_END>, 9..11 three depth codes; N = 2.
IDS = SpatialTokenIds(seg=6, depth_start=7, depth_end=8, code_start=9, num_codes=3, num_depth_tokens=2)
V = 12
CODE_VALUES = [0.0, 0.5, 1.0]  # the fake decoder maps a code distribution to sum_k p_k * value_k per cell


IMPLEMENTATIONS = {
    "reference": reference_lm_head_terms,
    # gradcheck runs backward many times on one graph: keep the fused buffers intact between passes
    "fused_torch": lambda *args: fused_lm_head_terms(*args, chunk_size=3, single_backward=False),
}


def fake_soft_decode(probs):  # [nb, N, K] -> [nb, 1, 1, N]: one "pixel" per grid cell
    values = torch.tensor(CODE_VALUES, dtype=probs.dtype)
    return (probs @ values)[:, None, None, :]


def lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row))


def bce(x, t):
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def setup(impl):
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, V, dtype=torch.float64) * 2
    weight = torch.eye(V, dtype=torch.float64)  # logits == hidden states, so the hand computation reads them
    # labels:      -   -  [SEG] START c0  c2  END  t3  t4  t5
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7, 9, 11, 8, 3, 4, 5]])
    mask_logits = torch.tensor([[[[0.3, -1.2], [2.0, 0.1]]]], dtype=torch.float64)
    seg_masks = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[[0.2, 0.9]]]], dtype=torch.float64)
    return hidden, weight, labels, mask_logits, seg_masks, teacher, impl


def run(setup, cfg=None, **kw):
    hidden, weight, labels, mask_logits, seg_masks, teacher, impl = setup
    objective = PerceptioObjective(cfg or ObjectiveConfig(mask_point_samples=0), IDS)
    args = dict(hidden=hidden, lm_head_weight=weight, labels=labels, lm_terms_fn=impl, soft_decode=fake_soft_decode,
                mask_logits=mask_logits, num_seg=1, seg_masks=seg_masks, teacher_depth=teacher,
                has_teacher_depth=torch.tensor([True]))
    args.update(kw)
    return objective(**args)


def test_every_term_matches_hand_computation(setup):
    hidden, _, _, mask_logits, seg_masks, teacher, _ = setup
    h = hidden[0].tolist()
    ce = lambda t, y: lse(h[t]) - h[t][y]  # noqa: E731  position t predicts labels[t + 1]
    text = (ce(6, 3) + ce(7, 4) + ce(8, 5)) / 3
    marker = (ce(1, 6) + ce(2, 7) + ce(5, 8)) / 3
    restricted = lambda t, y: lse(h[t][9:12]) - h[t][y]  # noqa: E731
    token = (restricted(3, 9) + restricted(4, 11)) / 2
    mass = lambda t: sum(math.exp(x) for x in h[t][9:12]) / sum(math.exp(x) for x in h[t])  # noqa: E731
    # code mass wanted at the two code rows (t = 3, 4), none at the row predicting <DEPTH_END> (t = 5); N + 1 = 3
    count = (-math.log(mass(3)) - math.log(mass(4)) - math.log(1 - mass(5))) / 3
    probs = lambda t: [math.exp(x - lse(h[t][9:12])) for x in h[t][9:12]]  # noqa: E731
    decoded = [sum(p * v for p, v in zip(probs(t), CODE_VALUES)) for t in (3, 4)]
    reconstruction = (abs(decoded[0] - 0.2) + abs(decoded[1] - 0.9)) / 2
    x = mask_logits.flatten().tolist()
    y = seg_masks.flatten().tolist()
    sig = [1 / (1 + math.exp(-v)) for v in x]
    bce_mean = sum(bce(a, b) for a, b in zip(x, y)) / 4
    dice = 1 - (2 * sum(s * t for s, t in zip(sig, y)) + 1) / (sum(sig) + sum(y) + 1)
    mask = 2.0 * bce_mean + 0.5 * dice

    out = run(setup)
    expected = dict(text=text, marker=marker, token=token, count=count, reconstruction=reconstruction, mask=mask)
    for name, value in expected.items():
        assert out.terms[name].item() == pytest.approx(value, rel=1e-10), name
    assert out.total.item() == pytest.approx(sum(expected.values()), rel=1e-10)
    assert out.counts == dict(text=3, marker=3, token=2, count=1, reconstruction=1, mask=1, z_loss=8)


def test_weights_scale_terms_and_z_loss(setup):
    cfg = ObjectiveConfig(text_weight=0.5, marker_weight=0.0, token_weight=2.0, count_weight=0.0,
                          reconstruction_weight=3.0, mask_weight=0.0, z_loss_weight=1e-2, mask_point_samples=0)
    out = run(setup, cfg)
    h = setup[0][0].tolist()
    z = sum(lse(h[t]) ** 2 for t in range(1, 9)) / 8
    assert out.terms["z_loss"].item() == pytest.approx(z, rel=1e-10)
    t = out.terms
    assert out.total.item() == pytest.approx(
        0.5 * t["text"].item() + 2.0 * t["token"].item() + 3.0 * t["reconstruction"].item() + 1e-2 * z, rel=1e-10)


def test_reconstruction_falls_back_to_decoded_target_codes(setup):
    # Without a teacher map the target is the decode of the target codes (c0, c2) -> values (0.0, 1.0).
    out = run(setup, has_teacher_depth=torch.tensor([False]))
    h = setup[0][0].tolist()
    probs = lambda t: [math.exp(x - lse(h[t][9:12])) for x in h[t][9:12]]  # noqa: E731
    decoded = [sum(p * v for p, v in zip(probs(t), CODE_VALUES)) for t in (3, 4)]
    assert out.terms["reconstruction"].item() == pytest.approx((abs(decoded[0] - 0.0) + abs(decoded[1] - 1.0)) / 2)


def test_no_spatial_targets_gives_exact_zeros_but_runs_every_branch(setup):
    hidden, weight, _, mask_logits, _, _, _ = setup
    labels = torch.tensor([[IGNORE_INDEX] * 6 + [3, 4, 5, 1]])
    hidden = hidden.clone().requires_grad_(True)
    calls = []

    def counting_decode(probs):
        calls.append(probs.shape)
        return fake_soft_decode(probs)

    out = run(setup, hidden=hidden, labels=labels, soft_decode=counting_decode, num_seg=0,
              seg_masks=torch.zeros(0, 2, 2), teacher_depth=torch.zeros(0, 1, 1, 2),
              has_teacher_depth=torch.zeros(0, dtype=torch.bool))
    assert calls == [torch.Size([1, 2, 3])]  # the dummy decode still ran, once
    for name in ("marker", "token", "count", "reconstruction", "mask"):
        assert out.terms[name].item() == 0.0
    assert out.counts["token"] == 0 and out.counts["mask"] == 0
    out.total.backward()  # zero terms stay attached to the graph
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_decoder_runs_once_when_mixing_teacher_and_code_targets(impl):
    torch.manual_seed(1)
    labels = torch.tensor([[IGNORE_INDEX, 7, 9, 10, 8, 7, 11, 9, 8, 3]])
    hidden = torch.randn(1, 10, V, dtype=torch.float64)
    calls = []

    def counting_decode(probs):
        calls.append(tuple(probs.shape))
        return fake_soft_decode(probs)

    out = PerceptioObjective(ObjectiveConfig(mask_point_samples=0), IDS)(
        hidden=hidden, lm_head_weight=torch.eye(V, dtype=torch.float64), labels=labels,
        lm_terms_fn=IMPLEMENTATIONS[impl],
        soft_decode=counting_decode, mask_logits=torch.zeros(1, 1, 2, 2), num_seg=0, seg_masks=torch.zeros(0, 2, 2),
        teacher_depth=torch.rand(2, 1, 1, 2, dtype=torch.float64), has_teacher_depth=torch.tensor([True, False]),
    )
    assert calls == [(3, 2, 3)]  # two predicted blocks + one one-hot target decode, one call
    assert out.counts["count"] == 2


@pytest.mark.parametrize(
    "labels, message",
    [
        ([7, 9, 8, 3], "exactly N=2 depth codes"),
        ([7, 9, 10, 3], "closed by <DEPTH_END>"),
        ([3, 8, 4, 5], "without a matching"),
        ([3, 4, 7, 9], "runs past the end"),
        ([3, 9, 4, 5], "outside a"),
    ],
)
def test_malformed_depth_blocks_are_data_errors(labels, message):
    with pytest.raises(ValueError, match=message):
        find_depth_blocks(torch.tensor(labels), IDS)


def test_mask_loss_point_sampled_branch_by_hand():
    # Constant logits c on an all-foreground target: BCE = -log sigmoid(c) and Dice are known at any points.
    c, points = 0.7, 50
    logits = torch.full((2, 1, 8, 8), c)
    targets = torch.ones(2, 64, 64)
    s = 1 / (1 + math.exp(-c))
    dice = 1 - (2 * points * s + 1) / (points * s + points + 1)
    value = mask_loss(logits, targets, bce_weight=2.0, dice_weight=0.5, num_points=points)
    assert value.item() == pytest.approx(2.0 * -math.log(s) + 0.5 * dice, rel=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_reconstruction_gradcheck_through_real_vqvae(impl):
    """d(reconstruction)/d(hidden) through LM head, restricted softmax, soft merge and the VQ-VAE decoder."""
    torch.manual_seed(0)
    cfg = DepthVQVAEConfig(input_size=8, code_dim=4, base_channels=2, max_channels=4, num_res_blocks=1)
    vq = DepthVQVAE(cfg, num_codes=3, grid=2).double().eval()
    ids = SpatialTokenIds(seg=6, depth_start=7, depth_end=8, code_start=9, num_codes=3, num_depth_tokens=4)
    labels = torch.tensor([[IGNORE_INDEX, 7, 9, 10, 11, 9, 8, 3]])
    only_reconstruction = ObjectiveConfig(text_weight=0, marker_weight=0, token_weight=0, count_weight=0,
                                          mask_weight=0, reconstruction_weight=1.0, mask_point_samples=0)
    objective = PerceptioObjective(only_reconstruction, ids)
    teacher = torch.rand(1, 1, 1, 8, 8, dtype=torch.float64)[0]
    weight = torch.randn(V, 5, dtype=torch.float64)

    def reconstruction(hidden):
        return objective(
            hidden=hidden, lm_head_weight=weight, labels=labels,
            lm_terms_fn=IMPLEMENTATIONS[impl], soft_decode=vq.soft_decode,
            mask_logits=torch.zeros(1, 1, 2, 2, dtype=torch.float64), num_seg=0,
            seg_masks=torch.zeros(0, 2, 2), teacher_depth=teacher, has_teacher_depth=torch.tensor([True]),
        ).total

    hidden = torch.randn(1, 8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reconstruction, (hidden,), eps=1e-6, atol=1e-6)


def test_soft_decode_gradcheck_and_onehot_equals_decode():
    torch.manual_seed(0)
    cfg = DepthVQVAEConfig(input_size=8, code_dim=4, base_channels=2, max_channels=4, num_res_blocks=1)
    vq = DepthVQVAE(cfg, num_codes=5, grid=2).double().eval()
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vq.soft_decode(x.softmax(-1)), (logits,), eps=1e-6, atol=1e-6)
    codes = torch.randint(0, 5, (2, 4))
    onehot = torch.nn.functional.one_hot(codes, 5).double()
    torch.testing.assert_close(vq.soft_decode(onehot), vq.decode(codes))
