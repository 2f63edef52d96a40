"""Data: conversation layout, synthetic scenes and their tasks, source adapters, decoding, shards, the loader."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio_dist.data.conversation import ImageTokens, encode_conversation, spatial_answer_ids
from perceptio_dist.preprocess.config import SourceConfig
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
    records = list(iter_source(SourceConfig(type="refcoco", path=str(root), dataset="refcoco")))
    assert [r.meta["expression"] for r in records] == ["the coloured box", "box in the middle", "small cup top left"]
    assert all(r.task == "referring_seg" and r.with_seg and "polygons" in r.mask for r in records)
    assert records[0].turns[0][0] == "Please segment the coloured box in this image."
    assert Path(records[0].image).exists()
    val = list(iter_source(SourceConfig(type="refcoco", path=str(root), splits=["val"])))
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
    coco = list(iter_source(SourceConfig(type="coco", path=str(make_coco(tmp_path / "coco")))))
    assert [(r.meta["image_id"], r.meta["category"]) for r in coco] == [(1, "dog"), (2, "kite"), (3, "dog")]
    llava = list(iter_source(SourceConfig(type="llava", path=str(make_llava(tmp_path / "llava")))))
    assert len(llava) == 1 and llava[0].turns == [["What is in the picture?", "A box."], ["What colour is it?", "Grey."]]
    folder = list(iter_source(SourceConfig(type="image_folder", path=str(make_image_folder(tmp_path / "imgs")))))
    assert len(folder) == 4 and all(r.task == "depth" and r.with_depth for r in folder)
    limited = list(iter_source(SourceConfig(type="image_folder", path=str(tmp_path / "imgs"), max_records=2)))
    assert len(limited) == 2


@pytest.mark.skipif(not HARDBLINK.exists(), reason="HardBLINK files not found at ../shared/data/hardblink")
def test_hardblink_adapter_on_the_real_files():
    records = list(iter_source(SourceConfig(type="hardblink", path=str(HARDBLINK))))
    assert Counter(r.source for r in records) == {"hardblink_3": 124, "hardblink_4": 124, "hardblink_5": 124}
    assert all(r.split == "eval" and Path(r.image).exists() for r in records)
    assert all(r.turns[0][1] in {"(A)", "(B)", "(C)", "(D)", "(E)"} for r in records)
    five = [r for r in records if r.source == "hardblink_5"]
    assert {r.turns[0][1] for r in five} <= {"(A)", "(B)", "(C)", "(D)", "(E)"} and len({r.key for r in records}) == 372


# -------------------------------------------------------------------------------- decoding


def test_decode_draws_markers_and_quarantines_bad_records(tmp_path):
    coco = list(iter_source(SourceConfig(type="coco", path=str(make_coco(tmp_path / "coco")))))
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
    assert manifest["identities"]["depth_tokenizer"] == "vqvae:random(seed=0)"
    for shard in manifest["shards"]:
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
