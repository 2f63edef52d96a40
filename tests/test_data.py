"""Data: conversation layout, synthetic scenes and their tasks, source adapters, decoding, shards, the loader."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio_dist.data.conversation import ImageTokens, encode_conversation, spatial_answer_ids
from perceptio_dist.preprocess.config import (
    CocoSource,
    HardblinkSource,
    ImageFolderSource,
    LlavaSource,
    RefcocoSource,
)
from perceptio_dist.preprocess.stages import decode_row, draw_markers, plan_shards
from perceptio_dist.preprocess.records import Record
from perceptio_dist.preprocess.restricted_pickle import load_plain_pickle
from perceptio_dist.preprocess.scenes.render import render_scene
from perceptio_dist.preprocess.scenes.tasks import closest_point_markers, referring_expression
from perceptio_dist.data.shards import ShardSample, npy_load, read_manifest, read_shard
from perceptio_dist.preprocess.sources import iter_source
from perceptio_dist.data.training_data import build_loader
from perceptio_dist.eval.benchmarks import DEFAULT_HARDBLINK
from perceptio_dist.losses.objective import IGNORE_INDEX, find_depth_blocks
from perceptio_dist.model.spatial_tokens import add_spatial_tokens

from .fixtures import make_coco, make_image_folder, make_llava, make_refcoco

HARDBLINK = DEFAULT_HARDBLINK


@pytest.fixture
def ids(tiny_cfg, tiny_tokenizer):
    return add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)


# ----------------------------------------------------------------------------- conversation


def test_spatial_chain_of_thought_layout_and_multi_turn(tiny_tokenizer, ids):
    image = ImageTokens("<img>", "<IMG_CONTEXT>", "</img>", per_tile=16)
    spatial = spatial_answer_ids(ids, with_seg=True, depth_codes=list(range(16)))
    input_ids, labels = encode_conversation(tiny_tokenizer, image, 1,
                                            [["Segment the red box.", "Done."], ["And now?", "Nothing."]], spatial)
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((input_ids == context).sum()) == 16
    target = labels[labels != IGNORE_INDEX]
    assert target[0] == ids.seg and target[1] == ids.depth_start
    assert target[2:18].tolist() == [ids.code_start + c for c in range(16)]
    assert target[18] == ids.depth_end
    assert tiny_tokenizer.decode(target[19:]) == "Done.<|im_end|>Nothing.<|im_end|>"
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    assert tiny_tokenizer.decode(input_ids[:first]).endswith("<|im_start|>assistant\n")
    text = tiny_tokenizer.decode(input_ids)
    assert text.count("<img>") == 1 and "<|im_start|>user\nAnd now?<|im_end|>" in text
    with pytest.raises(ValueError, match="N=16"):
        spatial_answer_ids(ids, with_seg=False, depth_codes=[1, 2])


def test_image_after_question_keeps_the_image_to_depth_distance_fixed(tiny_tokenizer, ids):
    """image_position: after_question moves the image span behind the question (the default keeps InternVL's order),
    so image token i and depth token i are the same distance apart whatever the question's length."""
    from perceptio_dist.data.conversation import encode_prompt

    spatial = spatial_answer_ids(ids, with_seg=False, depth_codes=list(range(16)))
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    questions = ["Which is nearest?", "Please segment the small orange teddy on the left of the table."]

    def distances(after: bool) -> list[int]:
        image = ImageTokens("<img>", "<IMG_CONTEXT>", "</img>", per_tile=16, after_question=after)
        out = []
        for question in questions:
            input_ids, labels = encode_conversation(tiny_tokenizer, image, 1, [[question, "Done."]], spatial)
            first_image = int((input_ids == context).nonzero()[0])
            first_code = int((labels == ids.code_start).nonzero()[0])
            out.append(first_code - first_image)
            text = tiny_tokenizer.decode(input_ids)
            user = text.split("<|im_start|>user\n", 1)[1]
            assert user.startswith(question + "\n<img>") if after else user.startswith("<img>")
            prompt = encode_prompt(tiny_tokenizer, image, 1, question)
            assert prompt.tolist() == input_ids[:int((labels != IGNORE_INDEX).nonzero()[0])].tolist()
        return out

    before, after = distances(False), distances(True)
    assert before[0] != before[1]  # InternVL's order: the distance grows with the question
    assert after[0] == after[1]


# ---------------------------------------------------------------------------------- scenes


def test_scene_rendering_is_deterministic_and_consistent():
    a, b = render_scene(3, 160, 120), render_scene(3, 160, 120)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    assert not np.array_equal(a.image, render_scene(4, 160, 120).image)
    assert a.depth.shape == (120, 160) and 0.3 < a.depth.min() and a.depth.max() < 8.0
    for obj in a.objects:
        pixels = a.instances == obj.index + 1
        assert int(pixels.sum()) == obj.visible_pixels
        if obj.visible_pixels:
            assert obj.depth == pytest.approx(float(np.median(a.depth[pixels])))
            # objects stand on the table, nearer than the walls behind them
            assert obj.depth < np.percentile(a.depth, 95)


def test_referring_expressions_are_unique_and_true():
    rng = np.random.default_rng(0)
    objs = [
        {"index": 0, "kind": "sphere", "colour": "red", "centroid": [10, 50], "depth": 1.0},
        {"index": 1, "kind": "sphere", "colour": "red", "centroid": [90, 50], "depth": 1.0},
        {"index": 2, "kind": "duck", "colour": "yellow", "centroid": [50, 50], "depth": 1.0},
    ]
    for _ in range(20):
        assert referring_expression(objs[0], objs, rng) == "the red sphere left of the yellow duck"
        assert referring_expression(objs[1], objs, rng) == "the red sphere right of the yellow duck"
    twins = objs[:2]  # two red spheres and nothing to tell them apart by
    assert referring_expression(twins[0], twins, rng) is None


def test_closest_point_markers_follow_the_rules():
    rng = np.random.default_rng(1)
    depth = np.tile(np.linspace(4.0, 1.0, 200)[None], (100, 1)).astype(np.float32)  # nearer to the right
    for count in (3, 4, 5):
        points, closest = closest_point_markers(depth, count, rng)
        xs = sorted(p[0] for p in points)
        assert len(points) == count and min(np.diff(xs)) >= 0.12 * 200
        assert all(42 <= p[1] <= 58 for p in points)
        values = [depth[int(p[1]), int(p[0])] for p in points]
        assert closest == int(np.argmin(values))
        assert sorted(values)[1] >= 1.1 * sorted(values)[0]
    assert closest_point_markers(np.ones((100, 200), np.float32), 3, rng) is None  # no depth gap anywhere


# --------------------------------------------------------------------------------- sources


def test_refcoco_adapter_reads_the_refer_layout(tmp_path):
    root = make_refcoco(tmp_path)
    records = list(iter_source(RefcocoSource(path=str(root), dataset="refcoco")))
    assert [r.meta["expression"] for r in records] == ["the coloured box", "box in the middle", "small cup top left"]
    assert all(r.task == "referring_seg" and r.with_seg and "polygons" in r.mask for r in records)
    assert records[0].turns[0][0] == "Please segment the coloured box in this image."
    assert Path(records[0].image).exists()
    val = list(iter_source(RefcocoSource(path=str(root), splits=["val"])))
    assert [r.meta["expression"] for r in val] == ["validation only"]


def test_restricted_unpickler_refuses_code():
    assert load_plain_pickle(pickle.dumps([{"a": (1, 2.0, "x", None, b"y")}], protocol=2)) == [
        {"a": (1, 2.0, "x", None, b"y")}]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        load_plain_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_plain_pickle(pickle.dumps(Path("/etc")))


def test_coco_llava_and_image_folder_adapters(tmp_path):
    coco = list(iter_source(CocoSource(path=str(make_coco(tmp_path / "coco")))))
    assert [(r.meta["image_id"], r.meta["category"]) for r in coco] == [(1, "dog"), (2, "kite"), (3, "dog")]
    llava = list(iter_source(LlavaSource(path=str(make_llava(tmp_path / "llava")))))
    assert len(llava) == 1 and llava[0].turns == [["What is in the picture?", "A box."], ["What colour is it?", "Grey."]]
    folder = list(iter_source(ImageFolderSource(path=str(make_image_folder(tmp_path / "imgs")))))
    assert len(folder) == 4 and all(r.task == "depth" and r.with_depth for r in folder)
    limited = list(iter_source(ImageFolderSource(path=str(tmp_path / "imgs"), max_records=2)))
    assert len(limited) == 2


@pytest.mark.skipif(not HARDBLINK.exists(), reason="HardBLINK files not found at ../shared/data/hardblink")
def test_hardblink_adapter_on_the_real_files():
    records = list(iter_source(HardblinkSource(path=str(HARDBLINK))))
    assert Counter(r.source for r in records) == {"hardblink_3": 124, "hardblink_4": 124, "hardblink_5": 124}
    assert all(r.split == "eval" and Path(r.image).exists() for r in records)
    assert all(r.turns[0][1] in {"(A)", "(B)", "(C)", "(D)", "(E)"} for r in records)
    five = [r for r in records if r.source == "hardblink_5"]
    assert {r.turns[0][1] for r in five} <= {"(A)", "(B)", "(C)", "(D)", "(E)"} and len({r.key for r in records}) == 372


# -------------------------------------------------------------------------------- decoding


def test_decode_draws_markers_and_quarantines_bad_records(tmp_path):
    coco = list(iter_source(CocoSource(path=str(make_coco(tmp_path / "coco")))))
    rows = {r.meta["ann_id"]: decode_row({"shard": "s", "record": json.dumps(r.to_dict())}) for r in coco}
    assert rows[1]["error"] == "" and rows[1]["image_ext"] == "jpg"
    mask = np.asarray(Image.open(io.BytesIO(rows[1]["mask"])))
    assert mask.shape == (72, 96) and int((mask > 0).sum()) == 40 * 30  # the annotation's area
    assert "empty mask" in rows[3]["error"]
    assert "FileNotFoundError" in rows[4]["error"]
    broken = Record(key="b", source="x", task="depth", image=str(make_image_folder(tmp_path / "f") / "broken.jpg"),
                    turns=[["q", "a"]], with_depth=True)
    assert "UnidentifiedImageError" in decode_row({"shard": "s", "record": json.dumps(broken.to_dict())})["error"]
    marked = Record(key="m", source="x", task="relative_depth", image=str(tmp_path / "f" / "img_0.jpg"),
                    turns=[["q", "(A)"]], points=[[20.0, 36.0], [70.0, 36.0]])
    row = decode_row({"shard": "s", "record": json.dumps(marked.to_dict())})
    drawn = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB")).astype(int)
    assert row["image_ext"] == "png" and drawn[36, 20 + 3, 0] == 255 and drawn[36, 20 + 3, 1] == 0  # red ring


def test_large_images_are_downscaled_with_their_annotations(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((400, 800, 3), np.uint8)).save(path)
    record = Record(key="k", source="x", task="referring_seg", image=str(path), turns=[["q", "a"]], with_seg=True,
                    mask={"polygons": [[100, 100, 300, 100, 300, 300, 100, 300]], "size": [400, 800]},
                    points=[[400.0, 200.0]])
    row = decode_row({"shard": "s", "record": json.dumps(record.to_dict())}, max_image_side=200)
    assert Image.open(io.BytesIO(row["image"])).size == (200, 100)
    assert Image.open(io.BytesIO(row["mask"])).size == (200, 100)
    assert json.loads(row["record"])["points"] == [[100.0, 50.0]]


def test_draw_markers_labels_every_point():
    image = Image.new("RGB", (336, 336), (90, 90, 90))
    out = np.asarray(draw_markers(image, [[50, 168], [150, 168], [250, 168]]))
    assert (out != 90).any(axis=2).sum() > 3 * 40  # three rings and three label boxes


def test_plan_shards_is_deterministic_and_rejects_duplicate_keys():
    recs = [Record(key=f"k{i:02d}", source="s", task="vqa" if i % 2 else "depth", image="x", turns=[["q", "a"]])
            for i in range(7)]
    plans = plan_shards(list(reversed(recs)), shard_size=2)
    assert [p.name for p in plans] == ["depth/depth-000000", "depth/depth-000001", "vqa/vqa-000000",
                                       "vqa/vqa-000001"]
    assert [r.key for r in plans[0].records] == ["k00", "k02"]
    with pytest.raises(ValueError, match="duplicate"):
        plan_shards(recs + recs[:1], 2)


# ---------------------------------------------------------------------------------- shards


def test_shards_and_manifest_agree(tiny_shards):
    manifest = read_manifest(tiny_shards)
    assert manifest["num_samples"] == sum(manifest["counts"]["task"].values()) > 150
    assert set(manifest["counts"]["task"]) == {"referring_seg", "relative_depth", "depth", "vqa"}
    assert manifest["identities"]["depth_tokenizer"] == "random"
    for shard in manifest["shards"]:
        assert shard["producer"]["depth_tokenizer"] == "random" and shard["producer"]["answer_format"]
        samples = list(read_shard(tiny_shards / shard["path"]))
        assert [s.key for s in samples] == shard["keys"] and len(samples) == shard["num_samples"]
        for s in samples:
            info = s.info
            image = Image.open(io.BytesIO(s.image))
            assert [image.height, image.width] == info["image_size"]
            if info["with_seg"]:
                assert Image.open(io.BytesIO(s.mask_png)).size == image.size
            if info["with_depth"]:
                codes, depth = npy_load(s.codes_npy), npy_load(s.depth_npy)
                assert codes.shape == (16,) and codes.dtype == np.uint8 and codes.max() < 32
                assert depth.shape == (32, 32) and depth.dtype == np.float16
                assert float(depth.min()) == 0.0 and float(depth.max()) == 1.0
    # what each task's answers carry, counted from the samples themselves; the export turns it into chain.json
    carried: dict[str, list[int]] = {}
    for shard in manifest["shards"]:
        for s in read_shard(tiny_shards / shard["path"]):
            counts = carried.setdefault(s.info["task"], [0, 0, 0])
            counts[0] += 1
            counts[1] += bool(s.info["with_seg"])
            counts[2] += bool(s.info["with_depth"])
    assert {t: [c["samples"], c["with_seg"], c["with_depth"]] for t, c in manifest["chain"].items()} == carried


def test_the_export_records_the_chain_each_task_was_trained_with(tiny_cfg, tmp_path):
    """All samples of a task carry it: force; none: forbid; some: free; the no-depth ablation: no depth block."""
    import dataclasses

    from perceptio_dist.export import trained_chain

    # the tiny synthetic data: referring answers carry [SEG] and a depth block, depth tasks the block, vqa nothing
    assert trained_chain(tiny_cfg) == {
        "depth": {"seg": "forbid", "depth": "force"}, "referring_seg": {"seg": "force", "depth": "force"},
        "relative_depth": {"seg": "forbid", "depth": "force"}, "vqa": {"seg": "forbid", "depth": "forbid"}}
    manifest = json.loads((Path(tiny_cfg.data.shards) / "manifest.json").read_text())
    manifest["chain"] = {"referring_seg": {"samples": 10, "with_seg": 10, "with_depth": 0},
                         "relative_depth": {"samples": 4, "with_seg": 0, "with_depth": 3}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    mixed = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, shards=str(tmp_path)))
    assert trained_chain(mixed) == {"referring_seg": {"seg": "force", "depth": "forbid"},
                                    "relative_depth": {"seg": "forbid", "depth": "free"}}
    ablation = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, depth_tokens=False))
    assert all(c["depth"] == "forbid" for c in trained_chain(ablation).values())
    gone = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, shards=str(tmp_path / "gone")))
    assert trained_chain(gone) is None


# ---------------------------------------------------------------------------------- loader


def _loader(cfg, tokenizer, rank, world, **changes):
    from perceptio_dist.config.training import config_from_dict
    from perceptio_dist.model.perceptio import build_perceptio

    data = cfg.to_dict()  # through a dict: a change may name an experiment's field (data.depth_context_noise)
    for section in ("train", "data"):
        data[section].update(changes.pop(section, {}))
    cfg = config_from_dict(data)
    model = build_perceptio(cfg.model, tokenizer)
    return build_loader(cfg, tokenizer, model.token_ids, rank, world)


def _keys(loader, n):
    it = iter(loader)
    return [next(it).keys for _ in range(n)]


@pytest.mark.parametrize("rank", [0, 1])
def test_loader_resumes_exactly_with_two_ranks_and_two_workers(tiny_cfg, tiny_tokenizer, rank):
    changes = {"data": {"num_workers": 2}}
    loader = _loader(tiny_cfg, tiny_tokenizer, rank, 2, **changes)
    first = _keys(loader, 5)  # k = 5 batches (odd: the next one comes from the second worker)
    state = loader.state_dict()
    following = _keys(loader, 6)  # m = 6 more
    fresh = _loader(tiny_cfg, tiny_tokenizer, rank, 2, **changes)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON (it goes into checkpoints)
    assert _keys(fresh, 6) == following
    assert first != following[:5]
    other = _loader(tiny_cfg, tiny_tokenizer, 1 - rank, 2, **changes)
    assert not set(k for b in _keys(other, 5) for k in b) & set(k for b in first for k in b)  # ranks disjoint


def test_one_rank_with_accumulation_reads_what_two_ranks_read(tiny_cfg, tiny_tokenizer):
    two = [_keys(_loader(tiny_cfg, tiny_tokenizer, r, 2), 4) for r in range(2)]
    one = _keys(_loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"grad_accum_steps": 2}), 8)
    for step in range(4):  # step t = micro-batches 2t, 2t+1 of one rank = micro-batch t of ranks 0 and 1
        assert one[2 * step] == two[0][step] and one[2 * step + 1] == two[1][step]


def test_task_weights_and_the_no_depth_ablation(tiny_cfg, tiny_tokenizer):
    only_vqa = _loader(tiny_cfg, tiny_tokenizer, 0, 1, data={"task_weights": {"vqa": 1.0, "depth": 0.0}})
    batches = [next(iter(only_vqa)) for _ in range(1)]
    assert all("vqa" in k for b in batches for k in b.keys)
    mixed = _loader(tiny_cfg, tiny_tokenizer, 0, 1, data={"task_weights": {"vqa": 3.0, "depth": 1.0}},
                    train={"micro_batch_size": 8})
    keys = [k for b in _keys(mixed, 10) for k in b]
    share = sum("vqa" in k for k in keys) / len(keys)
    assert 0.6 < share < 0.9  # 0.75 expected
    ids = add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)
    with_depth = next(iter(_loader(tiny_cfg, tiny_tokenizer, 0, 1, data={"task_weights": {"depth": 1.0}})))
    assert int((with_depth.labels == ids.depth_start).sum()) == with_depth.num_samples
    ablation = next(iter(_loader(tiny_cfg, tiny_tokenizer, 0, 1,
                                 data={"task_weights": {"depth": 1.0}, "depth_tokens": False})))
    assert ablation.keys == with_depth.keys
    assert int((ablation.labels == ids.depth_start).sum()) == 0 and ablation.teacher_depth.shape[0] == 0


def test_a_curriculum_phase_reads_only_its_tasks_and_resumes_across_the_switch(tiny_cfg, tiny_tokenizer):
    """data.curriculum through the real loader: depth samples only for the first 3 steps, then VQA only; a
    loader restored at step 2 reads what the uninterrupted one reads, across the switch."""
    changes = {"data": {"task_weights": {"vqa": 1.0}, "curriculum": [{"until_step": 3, "task_weights": {"depth": 1.0}}]}}
    loader = _loader(tiny_cfg, tiny_tokenizer, 0, 1, **changes)
    keys = _keys(loader, 6)
    assert all("depth" in k for b in keys[:3] for k in b) and all("vqa" in k for b in keys[3:] for k in b), keys
    again = _loader(tiny_cfg, tiny_tokenizer, 0, 1, **changes)
    _keys(again, 2)
    fresh = _loader(tiny_cfg, tiny_tokenizer, 0, 1, **changes)
    fresh.load_state_dict(again.state_dict())
    assert _keys(fresh, 4) == keys[2:]


def test_depth_context_noise_corrupts_only_the_input_codes(tiny_cfg, tiny_tokenizer):
    """data.depth_context_noise: the same samples, the same labels; inputs differ only at depth-code positions,
    by about the configured share, with codes; drawn from the sample key (two loaders agree); evaluation's
    builder never adds it."""
    from perceptio_dist.data.training_data import build_sample_builder

    ids = add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)
    weights = {"task_weights": {"depth": 1.0}}
    clean = _loader(tiny_cfg, tiny_tokenizer, 0, 1, data=weights, train={"micro_batch_size": 8})
    noisy = [_loader(tiny_cfg, tiny_tokenizer, 0, 1, data={**weights, "depth_context_noise": 0.5},
                     train={"micro_batch_size": 8}) for _ in range(2)]
    a, b, c = (next(iter(loader)) for loader in (clean, *noisy))
    assert a.keys == b.keys and torch.equal(a.labels, b.labels) and torch.equal(b.input_ids, c.input_ids)
    is_code = (a.labels >= ids.code_start) & (a.labels < ids.code_end)
    changed = a.input_ids != b.input_ids
    assert not (changed & ~is_code).any()
    assert ((b.input_ids >= ids.code_start) & (b.input_ids < ids.code_end))[is_code].all()
    # a replaced code is uniform over K, so 1/K of the draws land on the true code
    share = changed[is_code].float().mean().item() / (1 - 1 / ids.num_codes)
    assert 0.35 < share < 0.65, share
    from perceptio_dist.config.training import config_from_dict

    noisy_cfg = config_from_dict({**tiny_cfg.to_dict(), "data": {**tiny_cfg.to_dict()["data"], "depth_context_noise": 0.5}})
    assert build_sample_builder(noisy_cfg, tiny_tokenizer, ids).input_transforms == ()  # training only
    (noise,) = build_sample_builder(noisy_cfg, tiny_tokenizer, ids, training=True).input_transforms
    assert noise.rate == 0.5 and noise.tasks is None


def test_depth_context_noise_only_in_the_named_tasks(tiny_cfg, tiny_tokenizer):
    """data.depth_context_noise_tasks: the named task's blocks are noised, the others keep their true codes."""
    ids = add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)
    weights = {"task_weights": {"depth": 1.0, "referring_seg": 1.0}}
    clean = next(iter(_loader(tiny_cfg, tiny_tokenizer, 0, 1, data=weights, train={"micro_batch_size": 8})))
    noisy = next(iter(_loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"micro_batch_size": 8}, data={
        **weights, "depth_context_noise": 0.5, "depth_context_noise_tasks": ["depth"]})))
    assert clean.keys == noisy.keys
    changed = (clean.input_ids != noisy.input_ids).any(dim=1)
    is_depth_task = torch.tensor(["depth" in key and "seg" not in key for key in clean.keys])
    assert is_depth_task.any() and (~is_depth_task).any(), clean.keys  # both tasks in the batch
    assert torch.equal(changed, is_depth_task), (clean.keys, changed)


def test_loader_batches_are_well_formed(tiny_cfg, tiny_tokenizer):
    loader = _loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"micro_batch_size": 6})
    ids = add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)
    for batch, _ in zip(loader, range(4)):
        for row in range(batch.num_samples):
            labels = batch.labels[row][1:]
            find_depth_blocks(labels[labels != IGNORE_INDEX], ids)
        assert batch.seg_masks.shape[0] == int((batch.input_ids == ids.seg).sum())
        assert batch.teacher_depth.shape[0] == int((batch.labels == ids.depth_start).sum())
        assert batch.pixel_values.shape[1:] == (3, 64, 64) and batch.sam_images.shape[1:] == (3, 128, 128)


def test_corrupt_samples_are_dropped_and_counted(tiny_cfg, tiny_tokenizer, monkeypatch):
    loader = _loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"micro_batch_size": 4})
    clean = next(iter(loader))
    broken_key = clean.keys[1]
    from perceptio_dist.data.shard_access import OpenShards

    original = OpenShards.sample

    def corrupt(self, entry, index):
        s = original(self, entry, index)
        return ShardSample(s.key, b"garbage", s.image_ext, s.info, s.mask_png, s.depth_npy, s.codes_npy) \
            if s.key == broken_key else s

    fresh = _loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"micro_batch_size": 4})
    monkeypatch.setattr(OpenShards, "sample", corrupt)
    batch = next(iter(fresh))
    assert batch.keys == tuple(k for k in clean.keys if k != broken_key) and fresh.skipped == 1


def test_loader_state_from_another_global_batch_is_refused(tiny_cfg, tiny_tokenizer):
    state = _loader(tiny_cfg, tiny_tokenizer, 0, 1).state_dict()
    other = _loader(tiny_cfg, tiny_tokenizer, 0, 1, train={"micro_batch_size": 3})
    with pytest.raises(ValueError, match=r"global batch \(samples per optimizer step\) was 2, now 3"):
        other.load_state_dict(state)


def test_elastic_resume_keeps_the_global_batch_sequence(tiny_cfg, tiny_tokenizer):
    """Saved by 2 ranks x micro 1 x accum 2 after 3 steps; resumed by 1 rank x accum 4 and 4 ranks x accum 1."""
    layouts = {2: {"micro_batch_size": 1, "grad_accum_steps": 2}, 1: {"micro_batch_size": 1, "grad_accum_steps": 4},
               4: {"micro_batch_size": 1, "grad_accum_steps": 1}}

    def step_keys(world, steps, state=None):
        """Keys of each step's global batch, gathered from every rank of a layout."""
        per_step = [[] for _ in range(steps)]
        for rank in range(world):
            loader = _loader(tiny_cfg, tiny_tokenizer, rank, world, train=layouts[world])
            if state is not None:
                loader.load_state_dict(state)
            accum = layouts[world]["grad_accum_steps"]
            it = iter(loader)
            for i in range(steps * accum):
                per_step[i // accum] += list(next(it).keys)
        return [sorted(k) for k in per_step]

    saver = _loader(tiny_cfg, tiny_tokenizer, 0, 2, train=layouts[2])
    it = iter(saver)
    for _ in range(3 * 2):
        next(it)
    state = saver.state_dict()
    reference = step_keys(2, 5)
    for world in (1, 4):
        assert step_keys(world, 2, state) == reference[3:5]


def test_teacher_output_and_ground_truth_target(tmp_path):
    from perceptio_dist.teachers.depth_anything import DepthAnythingTeacher, inverse_depth_target

    from .fixtures import save_tiny_depth_anything

    teacher = DepthAnythingTeacher(str(save_tiny_depth_anything(tmp_path / "da")), input_size=56)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 50, 3), dtype=np.uint8), rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)]
    maps = teacher(images, out_size=16)
    assert [m.shape for m in maps] == [(16, 16), (16, 16)]
    assert all(m.min() == 0.0 and m.max() == pytest.approx(1.0) for m in maps)
    assert teacher.identity.startswith("depth_anything:da:")
    depth = np.ones((8, 8), np.float32)
    depth[:, 4:] = 2.0  # right half twice as far: inverse 0.5 -> normalised 0
    target = inverse_depth_target(depth, 4)
    assert target[:, :2].tolist() == [[1.0, 1.0]] * 4 and target[:, 2:].tolist() == [[0.0, 0.0]] * 4


def test_every_registered_source_type_has_its_adapter():
    """Source types are declared once (the members of preprocess/config.SourceConfig); the adapters follow."""
    import typing

    from perceptio_dist.preprocess.config import SOURCE_TYPES, SourceConfig
    from perceptio_dist.preprocess.sources import adapter

    members = typing.get_args(SourceConfig)
    assert SOURCE_TYPES == tuple(typing.get_args(typing.get_type_hints(m)["type"])[0] for m in members)
    assert SOURCE_TYPES == tuple(m().type for m in members)  # each member's default tag is its own
    for name in SOURCE_TYPES:
        assert callable(adapter(name)), name
    with pytest.raises(ValueError, match="unknown source type 'tfrecord'"):
        adapter("tfrecord")
