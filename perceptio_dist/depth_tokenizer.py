"""The depth tokenizer's workflow: train (train/vqvae_trainer.py), evaluate on real frames
(eval/tokenizer_report.py), and the codebook-size / grid ablation. Used by ``perceptio-vqvae``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ConfigError


def train_tokenizer(recipe: str, overrides: list[str]) -> dict:
    from .logging_setup import configure_logging
    from .train.vqvae_config import load_vqvae_config
    from .train.vqvae_trainer import VQVAETrainer

    cfg = load_vqvae_config(recipe, overrides)
    trainer = VQVAETrainer(cfg)
    configure_logging(trainer.dist.rank)
    return trainer.train()


def evaluate_tokenizer(tokenizer_dir: str, out_dir: str, rgbd_dir: str | None = None, num_sets: int = 500,
                       title: str = "Depth tokenizer on real RGB-D frames", ablation: list[dict] | None = None) -> str:
    from .eval.rgbd import DEFAULT_RGBD_DIR, evaluation_frames
    from .eval.tokenizer_report import evaluate, write_report
    from .train.vqvae_trainer import load_tokenizer, training_hashes

    folder = Path(tokenizer_dir)
    if not (folder / "tokenizer.json").exists():
        raise ConfigError(f"Config error at '--tokenizer': {folder} has no tokenizer.json (train one with "
                          "`perceptio-vqvae train`).")
    model, meta = load_tokenizer(folder)
    frames = evaluation_frames(Path(rgbd_dir) if rgbd_dir else DEFAULT_RGBD_DIR)
    results = evaluate(model, frames, Path(out_dir), num_sets, training_hashes=training_hashes(folder))
    return str(write_report(results, Path(out_dir), title, meta, ablation))


def ablate_tokenizers(recipe: str, overrides: list[str], codes: list[int], grids: list[int], out_dir: str,
                      num_sets: int = 500) -> str:
    """Train the recipe's tokenizer and its variants (each K at the recipe's grid, each grid at the recipe's K,
    same downsampling factor, same data and steps), evaluate all on the same frames, report them together."""
    from .eval.rgbd import evaluation_frames
    from .eval.tokenizer_report import evaluate
    from .train.vqvae_config import load_vqvae_config
    from .train.vqvae_trainer import VQVAETrainer, load_tokenizer, training_hashes

    base = load_vqvae_config(recipe, overrides)
    factor = base.depth_vqvae.input_size // base.tokens.depth_grid
    variants = sorted({(k, base.tokens.depth_grid) for k in codes} | {(base.tokens.num_depth_codes, g) for g in grids}
                      | {(base.tokens.num_depth_codes, base.tokens.depth_grid)})
    out = Path(out_dir)
    frames = evaluation_frames()
    rows = []
    for k, grid in variants:
        folder = out / "variants" / f"k{k}_grid{grid}"
        cfg = dataclasses.replace(
            base, output_dir=str(folder), progress_bar=False,
            tokens=dataclasses.replace(base.tokens, num_depth_codes=k, depth_grid=grid),
            depth_vqvae=dataclasses.replace(base.depth_vqvae, input_size=grid * factor),
        )
        if not (folder / "tokenizer.json").exists():
            VQVAETrainer(cfg).train()
        model, meta = load_tokenizer(folder)
        results = evaluate(model, frames, folder / "eval", num_sets, training_hashes=training_hashes(folder),
                           pictures=False)
        rows.append({"num_codes": k, "grid": grid, "usage": meta["final_metrics"]["usage"],
                     "mean": results["mean"]["tokenizer"]})
    main = out / "variants" / f"k{base.tokens.num_depth_codes}_grid{base.tokens.depth_grid}"
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    return evaluate_tokenizer(str(main), str(out), None, num_sets,
                              title="Depth tokenizer on real RGB-D frames, with ablations", ablation=rows)
