"""How much depth survives the tokenizer: real RGB-D frames -> encode -> decode, against trivial baselines.

For each frame (eval/rgbd.py): the ground truth goes through the training normalisation
(inverse, per-map min-max, the tokenizer's square input), is encoded to N codes and decoded; the
reconstruction is upsampled to the frame and scored with eval/depth_metrics.py (scale-and-shift
aligned AbsRel and delta<1.25, and marked-point ordering accuracy for 2-5 point sets). Two baselines
are scored on the same frames and the same point sets: a constant map and a vertical gradient
("lower is closer"). Outputs: metrics.json, one picture per frame (RGB | ground truth |
reconstruction | error) and report.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..teachers.depth_anything import inverse_depth_target
from .depth_metrics import abs_rel, align_to_depth, delta1, ordering_accuracy, sample_point_sets
from .rgbd import Frame

POINT_COUNTS = (2, 3, 4, 5)
METHODS = ("tokenizer", "constant", "vertical gradient")


def reconstruct(model, frame: Frame) -> np.ndarray:
    """The tokenizer's reconstruction of the frame's normalised inverse depth, at the frame's resolution."""
    depth = np.where(frame.valid, frame.depth, np.nan)
    target = inverse_depth_target(depth, model.input_size)
    with torch.no_grad():
        recon = model.decode(model.encode(torch.from_numpy(target)[None, None]))
    h, w = frame.depth.shape
    return F.interpolate(recon, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def baselines(frame: Frame) -> dict[str, np.ndarray]:
    h, w = frame.depth.shape
    return {"constant": np.zeros((h, w), np.float32),
            "vertical gradient": np.repeat(np.linspace(0, 1, h, dtype=np.float32)[:, None], w, 1)}


def score(pred_inverse: np.ndarray, frame: Frame, point_sets: dict[int, np.ndarray]) -> dict:
    aligned = align_to_depth(pred_inverse, frame.depth, frame.valid)
    out = {"abs_rel": abs_rel(aligned, frame.depth, frame.valid), "delta1": delta1(aligned, frame.depth, frame.valid)}
    for k, sets in point_sets.items():
        out[f"order_{k}"] = ordering_accuracy(pred_inverse, frame.depth, sets)
    return out


def picture(frame: Frame, recon: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aligned = align_to_depth(recon, frame.depth, frame.valid)
    error = np.where(frame.valid, np.abs(aligned - frame.depth) / np.maximum(frame.depth, 1e-6), np.nan)
    gt = np.where(frame.valid, frame.depth, np.nan)
    lo, hi = np.nanpercentile(gt, 2), np.nanpercentile(gt, 98)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [(frame.rgb, "RGB", None), (gt, "ground truth depth (m)", "turbo_r"),
              (aligned, "reconstruction (aligned, m)", "turbo_r"), (error, "|error| / depth", "magma")]
    for ax, (img, title, cmap) in zip(axes, panels):
        kwargs = {} if cmap is None else {"cmap": cmap, "vmin": 0 if cmap == "magma" else lo,
                                          "vmax": 0.5 if cmap == "magma" else hi}
        shown = ax.imshow(img, **kwargs)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        if cmap is not None:
            fig.colorbar(shown, ax=ax, fraction=0.035)
    fig.suptitle(frame.name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate(model, frames: list[Frame], out_dir: Path, num_sets: int = 500, seed: int = 0,
             training_hashes: set[str] | None = None, pictures: bool = True) -> dict:
    """Score ``model`` and the baselines on ``frames``; refuse any frame whose files were training data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"frames": {}, "mean": {}}
    for frame in frames:
        leaked = (training_hashes or set()) & frame.file_hashes()
        if leaked:
            raise RuntimeError(f"evaluation frame {frame.name} was in the tokenizer's training data")
        rng = np.random.default_rng([seed, sum(map(ord, frame.name))])
        point_sets = {k: sample_point_sets(frame.depth, frame.valid, k, num_sets, rng) for k in POINT_COUNTS}
        recon = reconstruct(model, frame)
        maps = {"tokenizer": recon, **baselines(frame)}
        results["frames"][frame.name] = {method: score(m, frame, point_sets) for method, m in maps.items()}
        if pictures:
            picture(frame, recon, out_dir / f"{frame.name}.png")
    for method in METHODS:
        keys = next(iter(results["frames"].values()))[method].keys()
        results["mean"][method] = {k: float(np.mean([f[method][k] for f in results["frames"].values()])) for k in keys}
    return results


def _row(name: str, metrics: dict) -> str:
    cells = [f"{metrics['abs_rel']:.3f}", f"{metrics['delta1']:.3f}"] + [f"{100 * metrics[f'order_{k}']:.1f}"
                                                                         for k in POINT_COUNTS]
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(results: dict, title: str, meta: dict | None = None, ablation: list[dict] | None = None) -> str:
    head = "| | AbsRel ↓ | δ<1.25 ↑ | " + " | ".join(f"order {k}-pt (%) ↑" for k in POINT_COUNTS) + " |"
    sep = "| --- | " + " | ".join(["---:"] * (2 + len(POINT_COUNTS))) + " |"
    lines = [f"# {title}", ""]
    if meta:
        lines += [f"Tokenizer: K = {meta['num_codes']} codes, {meta['grid']}x{meta['grid']} grid, "
                  f"{meta['depth_vqvae']['input_size']} px input, trained {meta['steps']} steps on "
                  f"{meta['training_maps']} maps (none of them an evaluation frame: checked by file hash). "
                  f"Final codebook usage {meta['final_metrics'].get('usage', float('nan')):.2f}, perplexity "
                  f"{meta['final_metrics'].get('perplexity', float('nan')):.1f}.", ""]
    lines += ["## Mean over frames", "", head, sep] + [_row(m, results["mean"][m]) for m in METHODS] + [""]
    lines += ["## Per frame", "", "| frame | method |" + head[3:], "| --- " + sep]
    for name, per_method in results["frames"].items():
        for method in METHODS:
            lines.append(f"| {name} " + _row(method, per_method[method]))
    lines.append("")
    if ablation:
        lines += ["## Ablation: codebook size and grid (tokenizer rows, mean over frames)", "",
                  "| K | grid | tokens | usage | AbsRel ↓ | δ<1.25 ↑ | "
                  + " | ".join(f"order {k}-pt (%) ↑" for k in POINT_COUNTS) + " |",
                  "| ---: | ---: | ---: | ---: | " + " | ".join(["---:"] * (2 + len(POINT_COUNTS))) + " |"]
        for row in ablation:
            m = row["mean"]
            lines.append(f"| {row['num_codes']} | {row['grid']}x{row['grid']} | {row['grid'] ** 2} | "
                         f"{row['usage']:.2f} " + _row("", m)[3:])
        lines.append("")
    lines += ["## Pictures", ""] + [f"![{name}]({name}.png)" for name in results["frames"]] + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path, title: str, meta: dict | None = None,
                 ablation: list[dict] | None = None) -> Path:
    (out_dir / "metrics.json").write_text(json.dumps({"results": results, "tokenizer": meta, "ablation": ablation},
                                                     indent=1))
    path = out_dir / "report.md"
    path.write_text(markdown(results, title, meta, ablation))
    return path
