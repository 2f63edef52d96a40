"""The toy world of the main job (issue 16): relative-depth questions a tiny model can read, depth grids in which
every marker has its own cell, several question sets per scene, code rows ordered by depth, and the sweep file."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.eval.baselines import legibility
from perceptio_dist.eval.benchmarks import EvalItem
from perceptio_dist.eval.scoring import parse_choice_letter
from perceptio_dist.model.perceptio import build_perceptio
from perceptio_dist.model.tokenizer import load_tokenizer
from perceptio_dist.preprocess.config import load_preprocess_config
from perceptio_dist.preprocess.scenes.render import render_scene, write_scene
from perceptio_dist.preprocess.scenes.tasks import PointRules, QuestionRules, closest_point_markers, scene_records
from perceptio_dist.preprocess.stages import MARKER_COLOURS, draw_markers
from perceptio_dist.experiments.toy.sweep import load_sweep, table_lines

from .conftest import overridden, run_process, tools_module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Three rendered scenes in their folders: (folder, meta, depth)."""
    out = []
    for seed in (3, 4, 5):
        folder = tmp_path_factory.mktemp("scene") / f"scene_{seed}"
        scene = render_scene(seed)
        write_scene(scene, folder)
        out.append((folder, json.loads((folder / "meta.json").read_text()), scene.depth))
    return out


def measured_marker_height(image: np.ndarray, letter: str) -> int:
    """Rows of ``image`` holding pixels of ``letter``'s colour: the disc's height, counted, not computed."""
    colour = np.array(MARKER_COLOURS[letter], dtype=np.int16)
    close = np.abs(image.astype(np.int16) - colour).max(axis=2) < 60
    rows = np.nonzero(close.any(axis=1))[0]
    return 0 if rows.size == 0 else int(rows.max() - rows.min() + 1)


def toy_questions():
    source = load_preprocess_config("preprocess_toy").sources[0]
    return source.question_rules()


def test_toy_recipe_matches_its_preprocessing_and_tokenizer():
    train = load_config("toy_spatial")
    pre = load_preprocess_config("preprocess_toy")
    assert (pre.tokens.num_depth_codes, pre.tokens.depth_grid) == (train.model.tokens.num_depth_codes,
                                                                    train.model.tokens.depth_grid)
    assert pre.sources[0].marker_grid == train.model.tokens.depth_grid
    assert pre.depth_vqvae.input_size == train.model.depth_vqvae.input_size
    from perceptio_dist.train.vqvae_config import load_vqvae_config

    tokenizer = load_vqvae_config("vqvae_toy")
    assert tokenizer.tokens == pre.tokens
    for name in ("input_size", "code_dim", "base_channels", "max_channels", "num_res_blocks"):
        assert getattr(tokenizer.depth_vqvae, name) == getattr(pre.depth_vqvae, name) == \
            getattr(train.model.depth_vqvae, name), name
    # one image token per depth cell: the tile's token grid is the depth grid
    b = train.model.backbone
    tokens_side = int(b.vision.image_size / b.vision.patch_size * b.downsample_ratio)
    assert tokens_side == train.model.tokens.depth_grid and b.max_tiles == 1


def test_toy_markers_are_legible_at_the_models_input(rendered):
    """Each letter's disc, drawn on a rendered scene and resized onto the toy recipe's tile as the model sees it,
    is at least 6 pixels tall (counted by colour), and legibility() reports what was counted; the HardBLINK
    style at the tiny recipe's 64-px tile is not (its letters are under 4 pixels)."""
    rules = toy_questions()
    tile = load_config("toy_spatial").model.backbone.vision.image_size
    folder, meta, depth = rendered[0]
    records = [r for r in scene_records(folder, meta, depth, ["relative_depth"], rules)]
    assert records
    for record in records:
        image = draw_markers(Image.open(record.image).convert("RGB"), record.points, record.marker_style)
        at_input = np.asarray(image.resize((tile, tile), Image.BILINEAR))
        heights = [measured_marker_height(at_input, letter) for letter in "ABCDE"[:len(record.points)]]
        assert min(heights) >= 6, heights
        item = EvalItem("g", record.key, np.asarray(image), "q", "(A)", "relative_depth", len(record.points),
                        points=record.points, marker_style=record.marker_style)
        estimate = legibility([item], tile, 8)["label_px_at_input"]
        assert abs(estimate - np.median(heights)) <= 2.5, (estimate, heights)
    # the old style at the tiny recipe's tile: the letter's height at input, from its white pixels
    hard = draw_markers(Image.fromarray(np.full((240, 320, 3), 90, np.uint8)), [[160.0, 120.0]], "hardblink")
    small = np.asarray(hard.resize((64, 64), Image.BILINEAR)).astype(int)
    white_rows = np.nonzero((small.min(axis=2) > 200).any(axis=1))[0]
    assert white_rows.size == 0 or white_rows.max() - white_rows.min() + 1 < 4


def test_every_marker_has_its_own_depth_cell_and_the_cells_agree(rendered):
    rules = toy_questions()
    grid = rules.points.grid
    for folder, meta, depth in rendered:
        records = scene_records(folder, meta, depth, ["relative_depth"], rules)
        assert len(records) >= 2  # several question sets per scene
        assert len({r.key for r in records}) == len(records)
        h, w = depth.shape
        for record in records:
            cells = [(int(y * grid / h), int(x * grid / w)) for x, y in record.points]
            assert len(set(cells)) == len(cells)
            # the closest point is also the closest by its cell's mean depth, computed here by slicing
            means = [depth[r * h // grid:(r + 1) * h // grid, c * w // grid:(c + 1) * w // grid].mean()
                     for r, c in cells]
            letter = parse_choice_letter(record.turns[0][1], len(record.points))
            assert int(np.argmin(means)) == "ABCDE".index(letter)


def test_grid_rule_refuses_what_only_point_depth_separates():
    """Two markers whose points differ in depth but fall in one cell: allowed without a grid, never with one."""
    depth = np.tile(np.linspace(4.0, 1.0, 160)[None], (80, 1)).astype(np.float32)
    rng = np.random.default_rng(0)
    shared = 0
    for _ in range(30):
        found = closest_point_markers(depth, 5, rng, PointRules(min_separation=0.05))
        if found:
            cells = {int(x * 2 / 160) for x, _ in found[0]}
            shared += len(cells) < 5
    assert shared > 0  # with a 2-wide grid, five points always share cells
    assert closest_point_markers(depth, 5, rng, PointRules(min_separation=0.05, grid=2)) is None
    points, closest = closest_point_markers(depth, 2, rng, PointRules(min_separation=0.05, grid=2))
    assert len({int(x * 2 / 160) for x, _ in points}) == 2


def test_one_set_per_scene_keeps_the_historical_question(rendered):
    folder, meta, depth = rendered[1]
    old = [r for r in scene_records(folder, meta, depth, ["relative_depth"]) if r.task == "relative_depth"]
    many = scene_records(folder, meta, depth, ["relative_depth"], QuestionRules(per_scene=4))
    assert old and many[0].to_dict() == old[0].to_dict()
    assert all(r.marker_style == "hardblink" for r in many)


def test_question_fields_are_validated():
    with pytest.raises(ConfigError, match="point_counts"):
        load_preprocess_config("preprocess_toy", ["sources.0.point_counts=[3,6]"])
    with pytest.raises(ConfigError, match="questions_per_scene"):
        load_preprocess_config("preprocess_toy", ["sources.0.questions_per_scene=0"])
    with pytest.raises(ConfigError, match="marker_style"):
        load_preprocess_config("preprocess_toy", ["sources.0.marker_style=neon"])


def test_depth_ordered_code_rows(tiny_cfg):
    """depth_order adds one rank-1 term to the code rows whose coefficients follow the depth each code decodes
    to, decoded here one code at a time; every other row is untouched."""
    torch.manual_seed(0)  # the backbone draws from the global generator; each build gets a fresh tokenizer
    plain = build_perceptio(tiny_cfg.model, load_tokenizer(tiny_cfg.model.backbone), seed=5)
    ordered_cfg = overridden(tiny_cfg, "model.tokens.code_embedding_init=depth_order").model
    torch.manual_seed(0)
    ordered = build_perceptio(ordered_cfg, load_tokenizer(tiny_cfg.model.backbone), seed=5)
    ids = plain.token_ids
    values = []
    with torch.no_grad():
        for k in range(ids.num_codes):
            values.append(float(plain.depth_vqvae.decode(torch.full((1, ids.num_depth_tokens), k)).mean()))
    values = np.array(values)
    for get in (lambda m: m.backbone.get_input_embeddings().weight, lambda m: m.lm_head.weight):
        a, b = get(plain).detach(), get(ordered).detach()
        assert torch.equal(a[:ids.code_start], b[:ids.code_start])
        delta = (b - a)[ids.code_start:ids.code_end].double().numpy()
        u, s, _ = np.linalg.svd(delta, full_matrices=False)
        assert s[1] < 1e-5 * s[0]  # rank one
        coefficients = u[:, 0] * s[0]
        assert abs(np.corrcoef(coefficients, values)[0, 1]) > 0.999


def test_an_export_keeps_its_trained_code_rows(tiny_cfg, tmp_path):
    """Loading a depth_order model back must not add the initialisation term again: the export's tokenizer knows
    the spatial tokens, so their rows are trained weights (this once perturbed every evaluated model)."""
    from perceptio_dist.export import load_exported, write_exported

    cfg = overridden(tiny_cfg, "model.tokens.code_embedding_init=depth_order")
    tokenizer = load_tokenizer(cfg.model.backbone)
    model = build_perceptio(cfg.model, tokenizer, seed=5).eval()
    write_exported(model, tokenizer, cfg, tmp_path / "export", "a random depth_order model")
    loaded, _ = load_exported(tmp_path / "export")
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_sweep_file_is_checked_before_anything_trains(tmp_path):
    scenes = tmp_path / "heldout"
    scenes.mkdir()
    good = {"recipe": "toy_spatial", "heldout_scenes": str(scenes),
            "configurations": [{"name": "base"}, {"name": "lr", "overrides": ["train.lr=1e-3"], "ablation": False}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(good))
    sweep = load_sweep(path)
    assert [e.slug for e in sweep.configurations] == ["base", "lr"] and not sweep.configurations[1].ablation
    for bad, match in (({**good, "recipes": "x"}, "unknown field"), ({**good, "heldout_scenes": str(tmp_path / "no")},
                                                                     "does not exist"),
                       ({**good, "configurations": [{"name": "x", "overrides": ["train.lr=-1"]}]}, "'x'"),
                       ({**good, "configurations": [{"name": "a b"}, {"name": "a-b"}]}, "must differ")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            load_sweep(path)


def test_perceptio_sweep_refuses_a_bad_file_and_unknown_names_before_training(tmp_path, capsys):
    from perceptio_dist.cli import CONFIG_ERROR_EXIT
    from perceptio_dist.cli.sweep import main

    scenes = tmp_path / "heldout"
    scenes.mkdir()
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"recipe": "toy_spatial", "heldout_scenes": str(scenes), "recipes": "x",
                                "configurations": [{"name": "base"}]}))
    with pytest.raises(SystemExit) as exit_:
        main(["--sweep", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == CONFIG_ERROR_EXIT and "unknown field" in capsys.readouterr().err
    path.write_text(json.dumps({"recipe": "toy_spatial", "heldout_scenes": str(scenes),
                                "configurations": [{"name": "base"}]}))
    with pytest.raises(SystemExit, match=r"--only names no configuration \['other'\]"):
        main(["--sweep", str(path), "--out", str(tmp_path / "out"), "--only", "other"])
    assert not (tmp_path / "out").exists()  # nothing trained


@pytest.mark.parametrize("name", ["toy_spatial", "toy_localisation"])
def test_shipped_sweep_files_validate(tmp_path, name):
    """Every configuration of the sweeps the README reports loads against its recipe (held-out scenes: a stand-in)."""
    import yaml

    from .conftest import ROOT

    data = yaml.safe_load((ROOT / "tools" / "sweeps" / f"{name}.yaml").read_text())
    (tmp_path / "heldout").mkdir()
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({**data, "heldout_scenes": str(tmp_path / "heldout")}))
    sweep = load_sweep(path)
    assert len(sweep.configurations) == len(data["configurations"]) >= 5


def test_sweep_table_by_hand(tmp_path):
    scenes = tmp_path / "heldout"
    scenes.mkdir()
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"recipe": "toy_spatial", "heldout_scenes": str(scenes),
                                "configurations": [{"name": "base"}]}))
    sweep = load_sweep(path)
    depth = {"synthetic_depth_3": {"accuracy": 0.6, "chain_consistency": 0.85, "depth_dependence": {"ratio": 0.614},
                                   "marker_cells": 0.125, "marker_found": 0.25, "marker_nearness": 0.5,
                                   "interventions": {"random": 0.3, "ground_truth": 0.62}},
             "synthetic_depth_4": {"accuracy": 0.5}, "train_seconds": 100}
    ablation = {"synthetic_depth_3": {"accuracy": 0.4}, "synthetic_depth_5": {"accuracy": 0.2}, "train_seconds": 90}
    rows = table_lines(sweep, [{"name": "base", "depth": depth, "ablation": ablation}])
    assert rows[-1] == "| base | 60.0 / 50.0 / – | 40.0 / – / 20.0 | 30.0 | 62.0 | 85 | 12.5 / 25.0 / 50.0 | 0.61 | 190 |"
    # Seeds: a row per seed, then mean ± sample sd per group: depth 3 points 60 and 70 -> 65.0 ± 7.1.
    other = {"synthetic_depth_3": {"accuracy": 0.7}, "synthetic_depth_4": {"accuracy": 0.5}, "train_seconds": 50}
    seeded = table_lines(sweep, [{"name": "base", "seeds": [{"seed": 1, "depth": depth, "ablation": ablation},
                                                             {"seed": 2, "depth": other}]}])
    assert seeded[-3].startswith("| base, seed 1 | 60.0 / 50.0 / – | 40.0 / – / 20.0 |")
    assert seeded[-2].startswith("| base, seed 2 | 70.0 / 50.0 / – | not trained |")
    assert seeded[-1] == ("| base, mean ± sd of 2 seeds | 65.0 ± 7.1 / 50.0 ± 0.0 / – | 40.0 ± 0.0 / – / 20.0 ± 0.0 |"
                          " | | | | | |")
    path.write_text(json.dumps({"recipe": "toy_spatial", "heldout_scenes": str(scenes), "seeds": [1, 1],
                                "configurations": [{"name": "base"}]}))
    with pytest.raises(ConfigError, match="distinct integers"):
        load_sweep(path)


def test_marker_step_scored_by_hand():
    from perceptio_dist.experiments.toy.marker_step import MarkerStep, group_marker_scores, marker_step_scores, parse_marker_step

    reference = "A at 3,4 near 7; B at 3,0 near 2; C at 3,6 near 5. (A)"
    assert parse_marker_step(reference) == MarkerStep({"A": (3, 4), "B": (3, 0), "C": (3, 6)}, {"A": 7, "B": 2, "C": 5})
    # A's cell right, nearness wrong; B named twice, its first mention counts (cell wrong, nearness right); C missing.
    first = marker_step_scores(reference, "A at 3,4 near 5; B at 3,5 near 2; B at 3,0 near 2. (A)")
    assert first == {"markers": 3, "cells": 1, "nearness": 1, "found": 1, "listed": False, "running": None, "running_of": None}
    # Every cell and level right, an extra letter D: not the right letters.
    second = marker_step_scores(reference, "A at 3,4 near 7; B at 3,0 near 2; C at 3,6 near 5; D at 1,1 near 1. (A)")
    assert second == {"markers": 3, "cells": 3, "nearness": 3, "found": 3, "listed": False, "running": None, "running_of": None}
    # The format broken after A: one cell, nothing else.
    third = marker_step_scores("A at 2,2 near 9; B at 3,0 near 1. (A)", "A at 2,2 near 8; B)")
    assert third == {"markers": 2, "cells": 1, "nearness": 0, "found": 1, "listed": False, "running": None, "running_of": None}
    assert marker_step_scores("(B)", "A at 1,1 near 1. (A)") is None  # no step in the reference: not scored
    exact = marker_step_scores(reference, reference)
    assert exact == {"markers": 3, "cells": 3, "nearness": 3, "found": 3, "listed": True, "running": None, "running_of": None}
    # Every marker found, every letter on another's cell: no cell right, all found.
    permuted = marker_step_scores(reference, "A at 3,0 near 2; B at 3,6 near 5; C at 3,4 near 7. (C)")
    assert permuted == {"markers": 3, "cells": 0, "nearness": 0, "found": 3, "listed": True, "running": None, "running_of": None}
    group = group_marker_scores([
        (reference, "A at 3,4 near 5; B at 3,5 near 2; B at 3,0 near 2. (A)"),
        (reference, "A at 3,4 near 7; B at 3,0 near 2; C at 3,6 near 5; D at 1,1 near 1. (A)"),
        ("A at 2,2 near 9; B at 3,0 near 1. (A)", "A at 2,2 near 8; B)"), (reference, reference),
        ("(B)", "A at 1,1 near 1. (A)")])  # the last has no step in its reference: left out
    # 11 markers: cells 1 + 3 + 1 + 3 = 8, nearness 1 + 3 + 0 + 3 = 7; one of four answers lists the right letters.
    # Most frequent cells: A (3,4) three times of four, B (3,0) four of four, C (3,6) three of three: 10 of 11.
    # Found, any letter: 1 + 3 + 1 + 3 = 8. The most frequent cells over all letters are (3,0) 4, (3,4) 3, (3,6) 3,
    # (2,2) 1: the three-marker items get (3,0), (3,4), (3,6), all found (9); the two-marker one (3,0), (3,4): 1.
    # Most frequent level per letter: A 7 (three of four), B 2 (three of four), C 5 (three of three): 9 of 11.
    assert group == {"marker_cells": 8 / 11, "marker_nearness": 7 / 11, "marker_found": 8 / 11, "marker_listed": 0.25,
                     "marker_cells_mode": 10 / 11, "marker_found_mode": 10 / 11, "marker_nearness_mode": 9 / 11,
                     "marker_running": None, "marker_count": 11, "marker_items": 4}

    # Through the evaluation's scoring: the same four answers as relative-depth items of one group.
    from perceptio_dist.eval.benchmarks import EvalItem
    from perceptio_dist.eval.generate import Prediction
    from perceptio_dist.experiments.toy.marker_step import marker_step_table
    from perceptio_dist.eval.metrics import score

    answers = ["A at 3,4 near 5; B at 3,5 near 2; B at 3,0 near 2. (A)",
               "A at 3,4 near 7; B at 3,0 near 2; C at 3,6 near 5; D at 1,1 near 1. (A)", "A at 2,2 near 8; B)",
               reference]
    references = [reference, reference, "A at 2,2 near 9; B at 3,0 near 1. (A)", reference]
    items = [EvalItem("synthetic_depth_3", f"k{i}", np.zeros((8, 8, 3), np.uint8), "q", ref, "relative_depth", 3)
             for i, ref in enumerate(references)]
    metrics, rows = score(items, [Prediction(text, [], None, None, None) for text in answers])
    assert {k: metrics.groups["synthetic_depth_3"].diagnostics["marker_step"][k] for k in group} == group
    assert rows[0]["marker_step"] == first
    table = marker_step_table(metrics.to_json())
    assert "| synthetic_depth_3 | 72.7 | 90.9 | 72.7 | 90.9 | 63.6 | 81.8 | 25.0 | – | 11 |" in table


def test_marker_step_without_cells_scored_by_hand():
    """marker_step_format: nearness: "A near 7; B near 2. (A)" is scored on nearness and letters; no cell scores."""
    from perceptio_dist.experiments.toy.marker_step import MarkerStep, group_marker_scores, marker_step_scores, \
        marker_step_table, parse_marker_step
    from perceptio_dist.experiments.toy.marker_step import marker_step_answer

    readout = [(3, 4, 7), (3, 0, 2), (4, 6, 5)]
    reference = marker_step_answer(readout, 0, "nearness")
    assert reference == "A near 7; B near 2; C near 5. (A)"
    assert marker_step_answer(readout, 0) == "A at 3,4 near 7; B at 3,0 near 2; C at 4,6 near 5. (A)"
    assert marker_step_answer(readout, 2, "nearness") is None  # C is not the nearest by its level
    assert parse_marker_step(reference) == MarkerStep({"A": None, "B": None, "C": None}, {"A": 7, "B": 2, "C": 5})
    # A right, B wrong, C missing; the cells a prediction names anyway are not scored.
    first = marker_step_scores(reference, "A at 1,1 near 7; B near 3. (A)")
    assert first == {"markers": 3, "cells": None, "nearness": 1, "found": None, "listed": False, "running": None, "running_of": None}
    second = "A near 6; B near 2; C near 5. (C)"
    two = "A near 4; B near 8. (B)"
    group = group_marker_scores([(reference, "A at 1,1 near 7; B near 3. (A)"), (reference, second),
                                 (two, two)])
    # 8 markers: nearness 1 + 2 + 2 = 5; listed: the second and third answers. Most frequent level per letter:
    # A 7 (two of three), B 2 (two of three), C 5 (two of two): 6 of 8.
    assert group == {"marker_nearness": 5 / 8, "marker_listed": 2 / 3, "marker_nearness_mode": 6 / 8,
                     "marker_cells": None, "marker_found": None, "marker_cells_mode": None, "marker_found_mode": None,
                     "marker_running": None, "marker_count": 8, "marker_items": 3}
    assert "| g | – | – | – | – | 62.5 | 75.0 | 66.7 | – | 8 |" in marker_step_table({"g": group})


def test_marker_step_reads_cells_and_nearness_by_hand():
    from perceptio_dist.experiments.toy.marker_step import marker_readout, marker_step_answer

    # 4x4 cells of 10x10 px; cell (r, c) at depth 1 + r + c metres: inverse 1/(1+r+c), normalised by hand
    depth = np.fromfunction(lambda y, x: 1.0 + y // 10 + x // 10, (40, 40)).astype(np.float32)
    inverse = 1.0 / np.array([[1.0 + r + c for c in range(4)] for r in range(4)])
    normalised = (inverse - inverse.min()) / (inverse.max() - inverse.min())
    points = [[5.0, 5.0], [35.0, 15.0], [25.0, 35.0]]  # cells (0,0), (1,3), (3,2)
    readout = marker_readout(depth, points, 4)
    assert readout == [(0, 0, 9), (1, 3, int(10 * normalised[1, 3])), (3, 2, int(10 * normalised[3, 2]))]
    assert marker_step_answer(readout, 0) == (f"A at 0,0 near 9; B at 1,3 near {readout[1][2]}; "
                                              f"C at 3,2 near {readout[2][2]}. (A)")
    assert marker_step_answer([(0, 0, 5), (0, 1, 5)], 0) is None  # a tie does not single out the closest
    with pytest.raises(ConfigError, match="marker_grid"):
        load_preprocess_config("preprocess_toy", ["sources.0.marker_step=true", "sources.0.marker_grid=null"])


def _marker_step_records(rendered, step_format: str) -> list:
    """The relative-depth records of one rendered scene with the toy questions and the given marker step."""
    folder, meta, depth = rendered[2]
    rules = dataclasses.replace(toy_questions(), marker_step=True, step_format=step_format)
    records = scene_records(folder, meta, depth, ["relative_depth"], rules)
    assert records
    return records


def test_marker_step_answers_parse_to_their_closest_letter(rendered):
    for record in _marker_step_records(rendered, "cells"):
        answer = record.turns[0][1]
        levels = [int(part.rsplit(" ", 1)[1]) for part in answer.split(". (")[0].split("; ")]
        letter = parse_choice_letter(answer, len(record.points))
        assert letter == "ABCDE"[int(np.argmax(levels))]
        assert sorted(levels)[-1] > sorted(levels)[-2]


def test_scan_step_by_hand():
    """marker_step_format: scan: the band's cells in reading order; markers, running nearest level, its letter."""
    from perceptio_dist.experiments.toy.marker_step import band_rows, marker_step_answer

    rules = PointRules(grid=8)
    assert band_rows(rules) == range(3, 5)  # points at 0.42-0.58 of the height: rows 3 and 4 of 8
    # A at row 3 col 2 (level 5), B at row 3 col 5 (level 3: not nearer), C at row 4 col 0 (level 8: the nearest).
    readout = [(3, 2, 5), (3, 5, 3), (4, 0, 8)]
    assert marker_step_answer(readout, 2, "scan", rules) == \
        "--A--B--C-------|--PPPPPPSSSSSSSS|--AAAAAACCCCCCCC. (C)"  # K=0 ... P=5, S=8
    assert marker_step_answer(readout, 0, "scan", rules) is None  # A is not the nearest by its level
    with pytest.raises(ValueError, match="rows"):
        marker_step_answer([(2, 2, 5), (3, 5, 3)], 0, "scan", rules)  # a marker outside the band


def test_scan_rows_are_one_token_per_cell(rendered):
    """The scan step's characters stay apart in the shipped tokenizer (every row character one token, so each sits
    at a fixed distance from its cell's depth token), and the answer parses to its closest letter."""
    from perceptio_dist.model.tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer("tiny_bpe")
    for record in _marker_step_records(rendered, "scan"):
        answer = record.turns[0][1]
        rows = answer.split(". (")[0]
        assert len(rows) == 3 * 16 + 2
        assert len(tokenizer(rows, add_special_tokens=False)["input_ids"]) == len(rows), rows
        letter = parse_choice_letter(answer, len(record.points))
        assert letter == rows.split("|")[2][-1]  # the nearest so far after the last cell


def test_scan_step_scored_by_hand():
    from perceptio_dist.experiments.toy.marker_step import MarkerStep, group_marker_scores, marker_step_scores, \
        marker_step_table, parse_marker_step

    reference = "--A--B--C-------|--PPPPPPSSSSSSSS|--AAAAAACCCCCCCC. (C)"
    assert parse_marker_step(reference) == MarkerStep({"A": (2,), "B": (5,), "C": (8,)},
                                                      {"A": None, "B": None, "C": None},
                                                      running="--PPPPPPSSSSSSSS--AAAAAACCCCCCCC")
    # B one cell too far right; the last running letter wrong: 31 of 32 running characters right.
    prediction = "--A---B-C-------|--PPPPPPSSSSSSSS|--AAAAAACCCCCCCB. (B)"
    assert marker_step_scores(reference, prediction) == {
        "markers": 3, "cells": 2, "nearness": None, "found": 2, "listed": True, "running": 31, "running_of": 32}
    assert marker_step_scores(reference, "--A--B--C---|--PP|--AA. (A)")["running"] == 0  # rows of another length
    group = group_marker_scores([(reference, prediction), (reference, reference)])
    assert group == {"marker_cells": 5 / 6, "marker_nearness": None, "marker_found": 5 / 6, "marker_listed": 1.0,
                     "marker_running": 63 / 64, "marker_cells_mode": 1.0, "marker_nearness_mode": None,
                     "marker_found_mode": 1.0, "marker_count": 6, "marker_items": 2}
    assert "| g | 83.3 | 100.0 | 83.3 | 100.0 | – | – | 100.0 | 98.4 | 6 |" in marker_step_table({"g": group})


def test_chain_probe_sequences_and_run():
    """tools/toy/probe_chain.py: labels are the next token on the answer only, the scan answer ends on its running
    letter, which is the nearest marker's; a few steps run and report both interventions."""
    probe = tools_module("toy/probe_chain")
    gen = torch.Generator().manual_seed(0)
    ids, labels, markers, nearest = probe.make_batch(gen, 6, "scan", [3, 4, 5], 0.0)
    answer_start = probe.DEPTH_AT + probe.GRID * probe.GRID + 1
    assert (labels[:, :answer_start - 1] == -100).all() and (labels[:, -1] == -100).all()
    assert torch.equal(labels[:, answer_start - 1:-1], ids[:, answer_start:])
    assert torch.equal(ids[:, -2], nearest) and torch.equal(ids[:, -5], nearest)  # "...X|(X)": row 3 ends on it
    assert ((markers > 0).sum(1) >= 3).all()
    rows = probe.main(["--formats", "letter", "scan", "--steps", "2", "--eval-items", "4"])
    assert [r["format"] for r in rows] == ["letter", "scan"]
    assert all(0.0 <= r["own"] <= 1.0 and 0.0 <= r["random"] <= 1.0 for r in rows)


def test_sincos_positions_by_hand():
    """Patch (r, c) of a 16-wide grid: channels [0, q) sin(r f_k), [q, 2q) cos(r f_k), then the same of c, with
    f_k = 10000^(-k/q); the built tower carries exactly that table after its [CLS] row."""
    from perceptio_dist.model.backbone import build_backbone

    cfg = load_config("toy_spatial", ["model.backbone.vision.position_init=sincos_2d"])
    vision = cfg.model.backbone.vision
    model = build_backbone(cfg.model.backbone, 700, 5, "sdpa", torch.float32)
    table = model.model.vision_tower.embeddings.position_embeddings.detach()[0]
    side, q = vision.image_size // vision.patch_size, vision.hidden_size // 4
    for r, c in ((0, 0), (3, 11), (15, 2)):
        row = table[1 + r * side + c].double().numpy()
        k = np.arange(q)
        f = 10000.0 ** (-k / q)
        expected = np.concatenate([np.sin(r * f), np.cos(r * f), np.sin(c * f), np.cos(c * f)])
        np.testing.assert_allclose(row, expected, atol=1e-6)
    assert torch.count_nonzero(table[0]) == 0
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_backbone(load_config("toy_spatial", ["model.backbone.vision.position_init=sincos_2d",
                                                   "model.backbone.vision.hidden_size=66",
                                                   "model.backbone.vision.num_heads=2"]).model.backbone,
                       700, 5, "sdpa", torch.float32)


def test_sweep_trains_evaluates_and_resumes(tmp_path, tiny_shards):
    """perceptio-sweep end to end on the tiny recipe (2 steps, 1 rank): each model trains, exports and is
    evaluated; the table's cells are the evaluations' own metrics; a second run trains nothing."""
    import subprocess
    import sys

    import yaml

    from .conftest import NO_TOKENIZER, ROOT

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "recipe": "tiny_cpu", "heldout_scenes": str(tiny_shards.parent / "scenes"), "nproc_per_node": 1,
        "eval_limit": 2, "eval_batch_size": 4,
        "common": [f"data.shards={tiny_shards}", NO_TOKENIZER, "train.max_steps=2", "train.warmup_steps=0"],
        "configurations": [{"name": "two steps"}]}))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "perceptio_dist.cli.sweep", "--sweep", str(sweep_file), "--out", str(out)]
    first = run_process(cmd, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())
    for model in ("depth_model", "ablation"):
        metrics = json.loads((out / "two_steps" / model / "eval" / "metrics.json").read_text())
        assert rows[0]["depth" if model == "depth_model" else "ablation"]["synthetic_depth_3"]["accuracy"] == \
            metrics["synthetic_depth_3"]["accuracy"]
    assert "depth_tokens: false" in (out / "two_steps" / "ablation" / "run" / "config.yaml").read_text()
    table = (out / "sweep.md").read_text()
    assert "| two steps |" in table
    logs = {p: p.stat().st_mtime_ns for p in out.glob("two_steps/*/*.log")}
    assert len(logs) == 4  # train and eval, both models
    second = run_process(cmd, timeout=300, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # nothing trained or evaluated again
    assert (out / "sweep.md").read_text() == table
    bad = subprocess.run([*cmd[:-2], "--out", str(out), "--only", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "names no configuration" in bad.stderr
    # Seeds: each seed trains in its own folder with train.seed and data.seed set; the summary row is the mean of
    # the runs' own evaluations.
    seeded_file = tmp_path / "seeded.yaml"
    seeded_file.write_text(json.dumps({**json.loads(sweep_file.read_text()), "seeds": [7, 8],
                                       "configurations": [{"name": "two steps", "ablation": False}]}))
    seeded_out = tmp_path / "seeded"
    third = run_process([*cmd[:4], str(seeded_file), "--out", str(seeded_out)], timeout=900, cwd=ROOT)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    accuracies = []
    for seed in (7, 8):
        folder = seeded_out / "two_steps" / f"seed_{seed}" / "depth_model"
        config = yaml.safe_load((folder / "run" / "config.yaml").read_text())
        assert config["train"]["seed"] == config["data"]["seed"] == seed
        accuracies.append(json.loads((folder / "eval" / "metrics.json").read_text())["synthetic_depth_3"]["accuracy"])
    mean = f"{100 * sum(accuracies) / 2:.1f} ± "
    assert f"| two steps, mean ± sd of 2 seeds | {mean}" in (seeded_out / "sweep.md").read_text()


def test_code_level_lookup_by_hand():
    """tools/toy/code_levels.py: code 1 is level 3 twice and level 4 once, code 2 always level 7: the best table gets
    3 of 4; levels (marker_step.nearness_level) are tenths of the normalised inverse depth, clipped to 0-9."""
    from perceptio_dist.experiments.toy.marker_step import nearness_level

    tool = tools_module("toy/code_levels")
    assert tool.best_lookup_accuracy([(1, 3), (1, 3), (1, 4), (2, 7)]) == 0.75
    assert [nearness_level(x) for x in (0.0, 0.09, 0.1, 0.55, 0.999, 1.0, -0.2)] == [0, 0, 1, 5, 9, 9, 0]


def test_code_levels_on_real_shards(tiny_shards, tmp_path):
    """On the session's shards with a saved cell-decoder tokenizer: one marker per point of every relative-depth
    question, and (a cell's decoded depth being a function of its code alone) the best code -> level table is at
    least as right as the decoded cells' levels, which are one such table."""
    import json

    from safetensors.torch import save_file

    from perceptio_dist.model.config import DepthVQVAEConfig
    from perceptio_dist.data.shards import read_shard
    from perceptio_dist.model.depth_vqvae import DepthVQVAE

    tool = tools_module("toy/code_levels")
    arch = DepthVQVAEConfig(input_size=32, code_dim=4, base_channels=2, max_channels=4, decoder="cell")
    torch.manual_seed(0)
    save_file(DepthVQVAE(arch, 8, 4).state_dict(), str(tmp_path / "tokenizer.safetensors"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"depth_vqvae": vars(arch), "num_codes": 8, "grid": 4}))
    result = tool.measure(tiny_shards, tiny_shards.parent / "scenes", tmp_path)
    questions = [s.info for tar in sorted((tiny_shards / "relative_depth").glob("*.tar")) for s in read_shard(tar)]
    assert result["questions"] == len(questions) > 0
    assert result["markers"] == sum(len(q["points"]) for q in questions)
    assert result["level_from_own_code"] >= result["decoded_level_right"] - 1e-12
    assert 0.0 <= result["decoded_single_out_nearest"] + result["decoded_ties"] <= 1.0


def test_shortcut_measure_by_hand_and_on_rendered_scenes(tmp_path):
    """tools/toy/shortcuts.py: the shortcuts pick the marker they name (by hand), and on questions the real generator
    makes from rendered scenes the camera's tilt shows: the lowest marker is the nearest far above chance."""
    from perceptio_dist.preprocess.config import load_preprocess_config

    tool = tools_module("toy/shortcuts")
    points = [[10.0, 50.0], [40.0, 80.0], [70.0, 20.0]]
    picks = {name: pick(points, [5, 9, 9]) for name, pick in tool.SHORTCUTS.items()}
    assert picks == {"lowest": 1, "highest": 2, "leftmost": 0, "rightmost": 2, "largest_region": 1}
    assert tool.region_sizes(np.array([[0, 0, 1], [2, 0, 1]])).tolist() == [[3, 3, 2], [1, 3, 2]]
    folders = []
    for seed in range(6):
        folders.append(tmp_path / f"scene_{seed}")
        write_scene(render_scene(seed), folders[-1])
    source = dataclasses.replace(load_preprocess_config("preprocess_toy").sources[0], questions_per_scene=15)
    result = tool.measure(folders, source)
    assert result["questions"] > 40 and 0.2 < result["chance"] < 0.34
    assert result["lowest"] > result["chance"] + 0.15
