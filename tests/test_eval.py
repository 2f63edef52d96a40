"""Evaluation: letter parsing, IoUs by hand, the constrained spatial decoding on a real (tiny, random)
exported model, benchmark readers (real HardBLINK files, refer layout, MMBench TSV), and perceptio-eval
end to end on 1 and 2 ranks with identical results."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio_dist.config.training import load_config
from perceptio_dist.eval.benchmarks import DEFAULT_HARDBLINK
from perceptio_dist.eval.generate import GenerationSettings, SpatialConstraint, SpatialPolicy, generate
from perceptio_dist.eval.intervals import wilson
from perceptio_dist.eval.scoring import MaskScores, parse_choice_letter
from perceptio_dist.model.spatial_tokens import SpatialTokenIds

from .conftest import NO_TOKENIZER, ROOT, run_process
from .fixtures import make_refcoco

HARDBLINK = DEFAULT_HARDBLINK


@pytest.mark.parametrize("text, n, expected", [
    ("(B)", 3, "B"), ("B", 3, "B"), ("b.", 4, "B"), ("Point C is the closest to the camera.", 3, "C"),
    ("The answer is (D)", 5, "D"), ("answer: a", 3, "A"), ("I think E", 5, "E"), ("(E)", 4, None),
    ("A point is closest", 3, None), ("closest", 3, None), ("", 3, None), ("( c )", 3, "C"),
    ("The answer is a point near the table.", 3, None), ("The answer is B, the lamp.", 3, "B"),
    ("Point A is the closest.", 3, "A"), ("I would say point C", 4, "C"), ("A is closest", 3, "A"),
])
def test_choice_letters_parse_from_free_text(text, n, expected):
    assert parse_choice_letter(text, n) == expected


def test_ciou_and_giou_by_hand():
    scores = MaskScores()
    target = np.zeros((4, 4), bool)
    target[:2, :2] = True  # 4 pixels
    predicted = np.zeros((4, 4), bool)
    predicted[:2, :1] = True  # 2 pixels inside
    assert scores.add(predicted, target) == pytest.approx(2 / 4)
    other = np.zeros((4, 4), bool)
    other[3, 3] = True
    assert scores.add(None, other) == 0.0  # no mask predicted: intersection 0, union 1
    assert scores.ciou == pytest.approx((2 + 0) / (4 + 1))
    assert scores.giou == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="does not match"):
        scores.add(np.zeros((2, 2), bool), target)


def test_referring_answers_that_repeat_the_expression_by_hand():
    from perceptio_dist.eval.benchmarks import EvalItem
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.eval.metrics import score

    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    references = ["Sure, it is the green teddy.", "Sure, it is the red cube.", "Sure, it is the duck."]
    answers = ["Sure, it is the green teddy. ", "Sure, it is the red cylinder.", "sure, it is the duck."]
    items = [EvalItem("synthetic_refer", f"r{i}", np.zeros((4, 4, 3), np.uint8), "q", ref, "referring_seg", mask=mask)
             for i, ref in enumerate(references)]
    metrics, rows = score(items, [Prediction(text, [], None, None, mask) for text in answers])
    # Surrounding spaces do not count, a wrong word or a changed capital does: 1 of 3.
    assert [row["answer_exact"] for row in rows] == [True, False, False]
    assert metrics.groups["synthetic_refer"].masks.answer_exact == pytest.approx(1 / 3)
    assert metrics.groups["synthetic_refer"].masks.ciou == pytest.approx(1.0)
    assert metrics.groups["synthetic_refer"].choices is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random Perceptio written as an export folder (the inference format) and loaded back."""
    from perceptio_dist.export import load_exported, write_exported
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer

    cfg = load_config("tiny_cpu", [NO_TOKENIZER])
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)  # the same random model whichever tests ran before
    model = build_perceptio(cfg.model, tokenizer).eval()
    folder = tmp_path_factory.mktemp("export") / "model"
    write_exported(model, tokenizer, cfg, folder, "a random test model")
    loaded, loaded_tokenizer = load_exported(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    return folder, loaded, loaded_tokenizer


def _inputs(model, tokenizer, folder, images, question="Which point is the closest to the camera?"):
    from perceptio_dist.data.conversation import encode_prompt
    from perceptio_dist.data.images import resize_normalised, to_tensor
    from perceptio_dist.data.training_data import build_sample_builder
    from perceptio_dist.export import exported_config

    builder = build_sample_builder(exported_config(folder), tokenizer, model.token_ids)
    tiles = [builder.tiles(im) for im in images]
    prompts = [encode_prompt(tokenizer, builder.image_tokens, t.shape[0], question + " " * i)
               for i, t in enumerate(tiles)]
    sam = [resize_normalised(to_tensor(im), builder.geo.sam_size) for im in images]
    return prompts, tiles, sam, [im.shape[:2] for im in images]


def test_constraint_state_machine_by_hand():
    from perceptio_dist.model.spatial_tokens import SpatialTokenIds

    ids = SpatialTokenIds(seg=10, depth_start=11, depth_end=12, code_start=13, num_codes=4, num_depth_tokens=3)
    c = SpatialConstraint(ids, 0, SpatialPolicy(seg="force", depth="force"))
    allowed = lambda g: set(torch.nonzero(c.allowed(g, 20)).flatten().tolist())  # noqa: E731
    assert allowed([]) == {10}
    assert allowed([10]) == {11}
    assert allowed([10, 11]) == {13, 14, 15, 16}
    assert allowed([10, 11, 13, 13, 16]) == {12}
    free_text = allowed([10, 11, 13, 13, 16, 12])
    assert not free_text & {10, 11, 12, 13, 14, 15, 16} and {0, 9, 17} <= free_text
    forbid = SpatialConstraint(ids, 0, SpatialPolicy(seg="forbid", depth="forbid"))
    assert not set(torch.nonzero(forbid.allowed([], 20)).flatten().tolist()) & {10, 11, 12, 13, 14, 15, 16}
    # The image-context token (here 9) never: an answer holding one could not be read back by the model.
    no_image = SpatialConstraint(ids, 0, SpatialPolicy(seg="free", depth="free"), never=(9,))
    assert 9 not in set(torch.nonzero(no_image.allowed([], 20)).flatten().tolist())
    assert 9 in free_text


@pytest.mark.parametrize("policy", [SpatialPolicy("forbid", "force"), SpatialPolicy("force", "force"),
                                    SpatialPolicy("forbid", "forbid"), SpatialPolicy("free", "free")])
def test_generation_obeys_the_spatial_constraint(exported, policy):
    folder, model, tokenizer = exported
    ids = model.token_ids
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60 + 20 * i, 80, 3), dtype=np.uint8) for i in range(2)]
    prompts, tiles, sam, sizes = _inputs(model, tokenizer, folder, images)
    for sample in (False, True):
        settings = GenerationSettings(max_new_tokens=30, do_sample=sample, seed=1)
        for pred, size in zip(generate(model, tokenizer, prompts, tiles, sam, sizes, policy, settings), sizes):
            g = pred.token_ids
            spatial = [t for t in g if t in (ids.seg, ids.depth_start, ids.depth_end) or ids.is_code(t)]
            if policy.depth == "force":
                start = g.index(ids.depth_start)
                assert g[start + 1:start + 1 + ids.num_depth_tokens] == [ids.code_to_token(c) for c in pred.depth_codes]
                assert g[start + 1 + ids.num_depth_tokens] == ids.depth_end
                assert pred.depth is not None and pred.depth.shape == (model.depth_vqvae.input_size,) * 2
            if policy.seg == "force":
                assert g[0] == ids.seg and pred.mask is not None and pred.mask.shape == size
            if policy == SpatialPolicy("forbid", "forbid"):
                assert spatial == [] and pred.depth is None and pred.mask is None
            # Codes only ever inside one complete block; at most one [SEG].
            assert g.count(ids.seg) <= 1 and g.count(ids.depth_start) <= 1
            codes_at = [i for i, t in enumerate(g) if ids.is_code(t)]
            if codes_at:
                start = g.index(ids.depth_start)
                assert codes_at == list(range(start + 1, start + 1 + ids.num_depth_tokens))


def test_mask_comes_from_the_seg_hidden_state_as_in_training(exported):
    """The generated [SEG]'s mask equals the training forward's mask for the same sequence."""
    import torch.nn.functional as F

    folder, model, tokenizer = exported
    image = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    prompts, tiles, sam, sizes = _inputs(model, tokenizer, folder, [image], "Please segment the red cube.")
    pred = generate(model, tokenizer, prompts, tiles, sam, sizes, SpatialPolicy("force", "free"),
                    GenerationSettings(max_new_tokens=8))[0]
    sequence = torch.cat([prompts[0], torch.tensor(pred.token_ids)])[None]
    with torch.no_grad():
        out = model(sequence, torch.ones_like(sequence), tiles[0], sam[0][None])
    expected = torch.sigmoid(F.interpolate(out.mask_logits[:1], size=sizes[0], mode="bilinear")[0, 0]) > 0.5
    assert out.num_seg == 1 and np.array_equal(pred.mask, expected.numpy())


def test_batches_hold_one_task_and_the_policy_follows_the_training_chain_by_hand():
    from types import SimpleNamespace

    from perceptio_dist.eval.predict import decoding_policy, plan_batches

    items = [SimpleNamespace(task=t) for t in ("relative_depth", "referring_seg", "relative_depth", "relative_depth")]
    # Per task in order of first appearance, in batches of 2: ranks take whole batches, one policy each.
    assert plan_batches(items, 2) == [[0, 2], [3], [1]]
    # No chain recorded: [SEG] for referring, the depth block for relative depth when trained with depth tokens.
    assert decoding_policy("referring_seg", None, True, "auto") == SpatialPolicy("force", "forbid")
    assert decoding_policy("relative_depth", None, True, "auto") == SpatialPolicy("forbid", "force")
    assert decoding_policy("relative_depth", None, False, "auto") == SpatialPolicy("forbid", "forbid")
    # The export's chain.json decides (multiple choice answers look like the vqa task's); --depth-policy overrides.
    chain = {"relative_depth": {"seg": "forbid", "depth": "free"}, "vqa": {"seg": "forbid", "depth": "forbid"}}
    assert decoding_policy("relative_depth", chain, True, "auto") == SpatialPolicy("forbid", "free")
    assert decoding_policy("multiple_choice", chain, True, "auto") == SpatialPolicy("forbid", "forbid")
    assert decoding_policy("relative_depth", chain, True, "force") == SpatialPolicy("forbid", "force")


def test_eval_placement_by_hand():
    from perceptio_dist.eval.run import eval_placement

    assert eval_placement("auto", "auto", 3, True) == (torch.device("cuda", 3), torch.bfloat16)
    assert eval_placement("auto", "auto", 3, False) == (torch.device("cpu"), torch.float32)
    assert eval_placement("cpu", "auto", 3, True) == (torch.device("cpu"), torch.float32)
    assert eval_placement("cuda", "fp32", 1, True) == (torch.device("cuda", 1), torch.float32)
    assert eval_placement("auto", "bf16", 0, False) == (torch.device("cpu"), torch.bfloat16)


def test_an_export_loads_in_bf16_on_the_named_device_and_generates(exported):
    """The GPU evaluation path on the CPU: every part created on the named device in bf16 (nothing left in fp32),
    inputs moved to the model, and the decoded depth and mask back as numpy arrays; its mask equals the training
    forward's for the same sequence, as in fp32."""
    import torch.nn.functional as F

    from perceptio_dist.export import load_exported

    folder, _, tokenizer = exported
    model, tokenizer = load_exported(folder, torch.bfloat16, "cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"cpu"}
    # Kept in fp32 on purpose: rotary frequencies (transformers) and SAM2's Fourier projection (seg_head.py).
    in_fp32 = {n for n, t in tensors.items() if t.dtype == torch.float32}
    assert in_fp32 == {"backbone.model.language_model.rotary_emb.inv_freq",
                       "backbone.model.language_model.rotary_emb.original_inv_freq",
                       "seg_head.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"}
    assert sum(t.dtype == torch.bfloat16 for t in tensors.values()) > 50
    image = np.random.default_rng(5).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    prompts, tiles, sam, sizes = _inputs(model, tokenizer, folder, [image], "Please segment the red cube.")
    pred = generate(model, tokenizer, prompts, tiles, sam, sizes, SpatialPolicy("force", "force"),
                    GenerationSettings(max_new_tokens=4))[0]
    assert pred.depth.dtype == np.float32 and pred.depth.shape == (model.depth_vqvae.input_size,) * 2
    sequence = torch.cat([prompts[0], torch.tensor(pred.token_ids)])[None]
    with torch.no_grad():
        out = model(sequence, torch.ones_like(sequence), tiles[0], sam[0][None])
    expected = torch.sigmoid(F.interpolate(out.mask_logits[:1].float(), size=sizes[0], mode="bilinear")[0, 0]) > 0.5
    assert pred.mask.dtype == bool and np.array_equal(pred.mask, expected.numpy())


@pytest.mark.skipif(not HARDBLINK.exists(), reason="../shared/data/hardblink is absent (real benchmark files)")
def test_hardblink_items_from_the_real_files():
    from perceptio_dist.eval.benchmarks import hardblink_items

    items = list(hardblink_items(HARDBLINK))
    groups = {g: [i for i in items if i.group == g] for g in ("hardblink_3", "hardblink_4", "hardblink_5")}
    assert all(len(v) == 124 for v in groups.values())
    for n, group in zip((3, 4, 5), groups.values()):
        assert all(i.num_choices == n and parse_choice_letter(i.answer, n) for i in group)
        assert group[0].image.shape == (336, 336, 3)


@pytest.mark.skipif(not HARDBLINK.exists(), reason="../shared/data/hardblink is absent (real benchmark files)")
def test_hardblink_scoring_of_fixed_predictions_against_the_real_answers():
    from perceptio_dist.eval.benchmarks import hardblink_items
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.eval.metrics import score

    items = list(hardblink_items(HARDBLINK))
    for text, expected in (("(A)", (41, 28, 23)), ("Point A is the closest.", (41, 28, 23))):
        metrics, rows = score(items, [Prediction(text, [], None, None, None) for _ in items])
        counts = tuple(round(metrics.groups[f"hardblink_{n}"].accuracy * 124) for n in (3, 4, 5))
        assert counts == expected
        assert metrics.means["hardblink_mean"].accuracy == pytest.approx(sum(expected) / 3 / 124)
        assert metrics.to_json()["hardblink_mean"] == {"accuracy": metrics.means["hardblink_mean"].accuracy,
                                                       "splits": 3}
    metrics, _ = score(items, [Prediction(i.answer, [], None, None, None) for i in items])  # the answers themselves
    assert all(metrics.groups[f"hardblink_{n}"].accuracy == 1.0 for n in (3, 4, 5))
    # The toy world's marker-step diagnostic is registered, but HardBLINK's letter answers give it nothing to read.
    from perceptio_dist.registry import EVAL_DIAGNOSTICS

    assert "marker_step" in EVAL_DIAGNOSTICS
    assert not any(group.diagnostics for group in metrics.groups.values())


def test_refcoco_and_mmbench_readers(tmp_path):
    from perceptio_dist.eval.benchmarks import mmbench_items, refcoco_items

    make_refcoco(tmp_path / "refer")
    items = list(refcoco_items(tmp_path / "refer", "refcoco", "unc", ["val"]))
    assert [i.group for i in items] and all(i.group == "refcoco_val" and i.mask is not None and i.mask.any()
                                            and i.mask.shape == i.image.shape[:2] for i in items)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
                   f"7\tWhat colour?\tLook closely.\tred\tblack\t\t\tB\t{image}\n")
    (item,) = list(mmbench_items(tsv))
    assert item.num_choices == 2 and item.answer == "B" and "A. red\nB. black" in item.question
    assert item.question.startswith("Look closely.") and item.image.shape == (8, 8, 3)


def test_mmbench_circular_evaluation_scored_by_hand(tmp_path):
    """Two 4-option questions and a 2-option one, each asked once per rotation. Answers chosen by hand: q1
    right every time, q2 right except in rotation 2, q3 right only in rotation 0. Circular: 1 of 3; single
    pass (rotation 0): 3 of 3; per pass: 4 + 3 + 1 of 10."""
    from perceptio_dist.eval.benchmarks import mmbench_items
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.eval.metrics import score

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
                   f"1\tq1\t\tred\tgreen\tblue\tpink\tC\t{image}\n"
                   f"2\tq2\t\tone\ttwo\tthree\tfour\tA\t{image}\n"
                   f"3\tq3\t\tyes\tno\t\t\tB\t{image}\n")
    items = list(mmbench_items(tsv, circular=True))
    assert [i.key for i in items] == [f"mmbench_{q}@{k}" for q, n in ((1, 4), (2, 4), (3, 2)) for k in range(n)]
    # rotation k puts option (i + k) mod n at letter i: q1's "blue" (C) is at C, B, A, D
    assert [i.answer for i in items[:4]] == ["C", "B", "A", "D"]
    assert "A. green\nB. blue\nC. pink\nD. red" in items[1].question
    assert [i.answer for i in items[8:]] == ["B", "A"]

    def answer(item, right):
        wrong = next(letter for letter in "ABCD" if letter != item.answer)
        return Prediction(f"({item.answer if right else wrong})", [], None, None, None)

    verdicts = [True] * 4 + [True, True, False, True] + [True, False]
    metrics, _ = score(items, [answer(i, ok) for i, ok in zip(items, verdicts)])
    m = metrics.groups["mmbench_circular"]
    assert m.circular.circular_accuracy == pytest.approx(1 / 3) and m.circular.single_pass_accuracy == 1.0
    assert m.accuracy == pytest.approx(8 / 10) and m.circular.questions == 3
    single = list(mmbench_items(tsv))
    assert [i.key for i in single] == ["mmbench_1", "mmbench_2", "mmbench_3"] and single[0].answer == "C"


def _eval(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    # One thread per process in both runs: float reductions, hence mask borders, depend on the thread count.
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return run_process([*launcher, "-m", "perceptio_dist.cli.eval", *args], timeout=600, cwd=ROOT, env=env)


def test_perceptio_eval_on_one_and_two_ranks_gives_the_same_report(exported, tmp_path):
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    folder, _, _ = exported
    write_scenes(tmp_path / "scenes", 2, seed=50_000, progress=False)
    common = ["--model", str(folder), "--synthetic-scenes", str(tmp_path / "scenes"), "--limit", "2",
              "--max-new-tokens", "24", "--batch-size", "3"]
    if HARDBLINK.exists():
        common += ["--hardblink", str(HARDBLINK)]
    one = _eval([*common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _eval([*common, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("metrics.json", "predictions.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert "synthetic_refer" in metrics and "ciou" in metrics["synthetic_refer"]
    if HARDBLINK.exists():
        assert metrics["hardblink_mean"]["splits"] == 3
    report = (tmp_path / "one" / "report.md").read_text()
    for group in metrics:
        if not group.endswith("_mean"):
            assert f"examples_{group}.png" in report and (tmp_path / "one" / f"examples_{group}.png").stat().st_size
    rows = [json.loads(line) for line in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    # the chain as trained: a depth block for relative depth (tiny recipe: 4 x 4 codes), none after [SEG]
    depth_rows = [r for r in rows if r["group"].startswith("synthetic_depth")]
    assert depth_rows and all(r["depth_codes"] is not None and len(r["depth_codes"]) == 16 for r in depth_rows)
    assert all(r["depth_codes"] is None and r["has_mask"] for r in rows if r["group"] == "synthetic_refer")
    # interventions: every answer with a depth block answered again; the metrics are the rows' shares
    from perceptio_dist.eval.benchmarks import synthetic_items
    from perceptio_dist.eval.faithfulness import ground_truth_codes

    _, model, _ = exported
    truth = {item.key: ground_truth_codes(model, item) for item in synthetic_items(tmp_path / "scenes")}
    for row in depth_rows:
        done = row["interventions"]
        assert set(done) >= {"ground_truth", "random", "constant"}, done
        assert done["constant"]["codes"] == [0] * 16 and done["ground_truth"]["codes"] == truth[row["key"]]
        assert "chain_consistent" in row
    for group in {r["group"] for r in depth_rows}:
        in_group = [r for r in depth_rows if r["group"] == group]
        for name, value in metrics[group]["interventions"].items():
            answered = [r["interventions"][name]["correct"] for r in in_group if name in r["interventions"]]
            expected = [r["correct"] for r in in_group] if name == "own" else answered
            assert value == pytest.approx(sum(expected) / len(expected)), (group, name)
        consistent = [r["chain_consistent"] for r in in_group]
        assert metrics[group]["chain_consistency"] == pytest.approx(sum(consistent) / len(consistent))
    assert "Does the answer use the depth chain?" in report


def test_perceptio_eval_rejects_bad_input_clearly(tmp_path):
    missing = _eval(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--hardblink", str(tmp_path)])
    assert missing.returncode == 2 and "not an exported model folder" in missing.stderr and "complete training checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr
    none = _eval(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert none.returncode == 2 and "name at least one benchmark" in none.stderr


# ------------------------------------------------------------------------------------------- faithfulness


def _item(group, points, answer="(A)", gt_depth=None, size=(40, 80)):
    from perceptio_dist.eval.benchmarks import EvalItem

    return EvalItem(group, f"{group}_{answer}_{len(points)}", np.zeros((*size, 3), np.uint8), "q", answer,
                    "relative_depth", len(points), points=points, gt_depth=gt_depth)


def test_nearest_point_and_chain_consistency_by_hand():
    from perceptio_dist.eval.faithfulness import chain_consistent, nearest_point
    from perceptio_dist.eval.generate import Prediction

    depth = np.zeros((4, 4), np.float32)
    depth[1, 3] = 0.9  # image 40 x 80: x in [60, 80), y in [10, 20) -> cell (1, 3)
    depth[3, 0] = 0.5  # x in [0, 20), y in [30, 40)
    points = [[10.0, 35.0], [70.0, 15.0], [30.0, 5.0]]
    assert nearest_point(depth, points, (40, 80)) == 1
    item = _item("g", points)
    with_map = Prediction("(B)", [], list(range(16)), depth, None)
    assert chain_consistent(item, with_map, "B") is True and chain_consistent(item, with_map, "A") is False
    assert chain_consistent(item, Prediction("(B)", [], None, None, None), "B") is None


def test_intervention_codes_and_prefix_by_hand():
    from perceptio_dist.eval.faithfulness import chain_prefix, intervention_codes
    from perceptio_dist.eval.generate import Prediction

    ids = SpatialTokenIds(seg=10, depth_start=11, depth_end=12, code_start=13, num_codes=4, num_depth_tokens=3)
    items = [_item("a", [[1, 1]]), _item("a", [[2, 2]]), _item("b", [[3, 3]]), _item("a", [[4, 4]])]
    own = {0: [1, 1, 1], 1: [2, 2, 2], 2: [3, 3, 3]}  # item 3's answer had no depth block
    truth = {1: [0, 3, 0]}
    codes = lambda name, i: intervention_codes(name, i, items, own, truth, 4, 3, seed=5)  # noqa: E731
    assert codes("own", 1) == [2, 2, 2] and codes("constant", 0) == [0, 0, 0]
    assert codes("ground_truth", 1) == [0, 3, 0] and codes("ground_truth", 0) is None
    assert codes("other_image", 0) == [2, 2, 2] and codes("other_image", 1) == [1, 1, 1]  # cyclic in group a
    assert codes("other_image", 2) is None and codes("constant", 3) is None  # alone in b; no own block
    random_codes = codes("random", 0)
    assert random_codes == codes("random", 0) and all(0 <= c < 4 for c in random_codes) and len(random_codes) == 3
    prediction = Prediction("(A)", [10, 11, 13, 14, 15, 12, 7, 8], [0, 1, 2], None, None)
    assert chain_prefix(prediction, [3, 3, 0], ids) == [10, 11, 16, 16, 13, 12]


def test_intervention_and_consistency_metrics_by_hand():
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.eval.metrics import score
    from perceptio_dist.eval.report import faithfulness_table

    depth = np.zeros((4, 4), np.float32)
    depth[0, 0] = 1.0  # the point at the top left is nearest
    points = [[5.0, 5.0], [70.0, 35.0]]
    items = [_item("synthetic_depth_2", points, "(A)"), _item("synthetic_depth_2", points, "(B)"),
             _item("synthetic_depth_2", points, "(A)")]
    own = [Prediction("(A)", [], [0] * 16, depth, None), Prediction("(A)", [], [0] * 16, depth, None),
           Prediction("(B)", [], [0] * 16, depth, None)]
    interventions = {"random": {0: Prediction("(B)", [], [1] * 16, None, None),
                                1: Prediction("(B)", [], [1] * 16, None, None),
                                2: Prediction("(B)", [], [1] * 16, None, None)},
                     "ground_truth": {1: Prediction("(B)", [], [2] * 16, None, None)}}
    metrics, rows = score(items, own, interventions)
    m = metrics.groups["synthetic_depth_2"]
    assert m.accuracy == pytest.approx(1 / 3)  # only the first answer is right
    # random: (B) everywhere, right only for the second item; ground truth: only item 1, right
    assert m.interventions.accuracy == {"own": pytest.approx(1 / 3), "random": pytest.approx(1 / 3),
                                        "ground_truth": 1.0}
    assert m.interventions.counts == {"own": 3, "random": 3, "ground_truth": 1}
    assert m.chain.consistency == pytest.approx(2 / 3)  # answers A, A, B; the map says A every time
    # metrics.json keeps its layout: the figures flat, in this order, a kind absent where the group has none.
    assert list(metrics.to_json()["synthetic_depth_2"]) == [
        "accuracy", "count", "accuracy_ci", "answer_letters", "chain_consistency", "chain_count",
        "chain_consistency_ci", "baselines", "interventions", "intervention_counts", "intervention_against_own"]
    # Each intervention against the own codes on the same items: random right where own was wrong and the other
    # way once (items 1 and 0); ground truth only on item 1, right where own was wrong.
    against = metrics.to_json()["synthetic_depth_2"]["intervention_against_own"]
    assert against["random"]["difference"] == 0.0 and against["random"]["count"] == 3
    assert against["random"]["mcnemar_p"] == 1.0
    assert against["ground_truth"]["difference"] == 1.0 and against["ground_truth"]["count"] == 1
    assert m.choices.interval == pytest.approx(wilson(1, 3))
    assert rows[1]["interventions"]["random"] == {"prediction": "(B)", "parsed": "B", "correct": True,
                                                  "codes": [1] * 16}
    table = "\n".join(faithfulness_table(metrics.to_json()))
    assert "| synthetic_depth_2 | 33.3 (3) | 100.0 (1) | 33.3 (3) | – | – | 66.7 (3) |" in table


def test_relative_depth_baselines_and_legibility_by_hand():
    from perceptio_dist.eval.baselines import baselines_table, legibility, relative_depth_baselines
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.eval.metrics import score

    # images 240 x 320 (H x W); labels 11 px tall there (0.035 x 320), 64 / 240 of that on a 64-px tile
    size = (240, 320)
    items = [_item("synthetic_depth_3", [[10, 100], [200, 130], [300, 110]], "(B)", size=size),  # lowest: B
             _item("synthetic_depth_3", [[10, 140], [100, 120], [300, 110]], "(A)", size=size),  # lowest: A
             _item("synthetic_depth_3", [[10, 100], [30, 110], [300, 130]], "(B)", size=size)]  # lowest: C
    b = relative_depth_baselines(items)
    assert b == {"chance": pytest.approx(1 / 3), "lowest_marker": pytest.approx(2 / 3),
                 "most_frequent_letter": pytest.approx(2 / 3)}
    leg = legibility(items, tile_size=64, depth_grid=4)  # cells 80 px wide, 60 px high
    assert leg["label_px_at_input"] == pytest.approx(11 * 64 / 240)
    assert leg["shared_cell"] == pytest.approx(1 / 3)  # only the third: (10, 100) and (30, 110) share cell (0, 1)
    metrics, _ = score(items, [Prediction("(B)", [], None, None, None)] * 3, geometry=(64, 4))
    assert metrics.groups["synthetic_depth_3"].baselines == b and metrics.groups["synthetic_depth_3"].legibility == leg
    assert metrics.groups["synthetic_depth_3"].choices.answer_letters == {"B": 3}
    table = "\n".join(baselines_table(metrics.to_json()))
    assert "| synthetic_depth_3 | 66.7 | 33.3 | 66.7 | 66.7 | 2.9 | 33.3 | B 3 |" in table


def test_depth_dependence_by_hand():
    """A map that is an affine function of the true inverse depth aligns to it exactly (AbsRel 0); the training
    mean map (a constant here) does not; the ratio says which follows the image."""
    from perceptio_dist.eval.depth_dependence import aligned_abs_rel, depth_dependence

    rng = np.random.default_rng(0)
    depth = rng.uniform(1.0, 4.0, (8, 8)).astype(np.float32).repeat(4, 0).repeat(4, 1)  # 32x32, constant 4x4 cells
    inverse = 1.0 / depth[::4, ::4]
    assert aligned_abs_rel((3.0 * inverse + 0.5).astype(np.float32), depth) < 1e-5
    flat = np.full((8, 8), 0.5, np.float32)
    # a constant aligns to the single best inverse depth: its error is that of the mean inverse depth, by hand
    truth = depth[::4, ::4].astype(np.float64)
    expected = np.mean(np.abs(1.0 / np.mean(1.0 / truth) - truth) / truth)
    assert aligned_abs_rel(flat, depth) == pytest.approx(expected, rel=1e-5)
    out = depth_dependence([((3.0 * inverse + 0.5).astype(np.float32), depth), (flat, depth)], flat)
    assert out["count"] == 2 and out["mean_map_absrel"] == pytest.approx(expected, rel=1e-5)
    assert out["generated_absrel"] == pytest.approx(expected / 2, rel=1e-4)
    assert out["ratio"] == pytest.approx(0.5, rel=1e-4)


def test_training_mean_depth_is_the_mean_of_the_stored_targets(tiny_shards):
    """Read back with tarfile and numpy, independently of the shard reader."""
    import tarfile

    from perceptio_dist.eval.depth_dependence import training_mean_depth

    maps = []
    for path in sorted(tiny_shards.glob("*/*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".depth.npy"):
                    maps.append(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))
    assert maps
    np.testing.assert_allclose(training_mean_depth(tiny_shards), np.mean(np.asarray(maps, np.float64), axis=0), rtol=1e-5, atol=1e-6)  # stored as float16
