"""report.md of an evaluation: the metrics tables and one picture per benchmark group (image, predicted mask against
the reference, decoded depth map, question, answer and verdict)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..registry import EVAL_DIAGNOSTICS
from .baselines import baselines_table
from .benchmarks import EvalItem
from .faithfulness import INTERVENTIONS
from .generate import Prediction


def faithfulness_table(metrics: dict) -> list[str]:
    """Markdown: per group, accuracy after each depth intervention and the chain consistency (eval/faithfulness.py)."""
    groups = [(name, m) for name, m in metrics.items() if "interventions" in m or "chain_consistency" in m]
    if not groups:
        return []
    lines = ["", "## Does the answer use the depth chain?", "",
             "Accuracy (%) when the answer follows the model's own depth codes, the ground truth's, random codes, a "
             "constant code or another image's codes; chain consistency: answers naming the point the model's own "
             "depth map puts nearest. Items per column in brackets.", "",
             "| group | " + " | ".join(INTERVENTIONS) + " | chain consistency |",
             "| --- |" + " ---: |" * (len(INTERVENTIONS) + 1)]
    for name, m in groups:
        acc, counts = m.get("interventions", {}), m.get("intervention_counts", {})
        cells = [f"{100 * acc[k]:.1f} ({counts[k]})" if k in acc else "–" for k in INTERVENTIONS]
        consistency = f"{100 * m['chain_consistency']:.1f} ({m['chain_count']})" if "chain_consistency" in m else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {consistency} |")
    return lines + depth_dependence_table(metrics)


def interval(bounds: list[float] | None) -> str:
    """' [lo, hi]' in percent, or '' without bounds."""
    return "" if not bounds else " [{:.1f}, {:.1f}]".format(*(100 * x for x in bounds))


def paired_cell(difference: dict) -> str:
    """A paired difference (eval/intervals.py) in points: '-28.5 [-38.0, -19.0], p 1e-06 (200)'."""
    low, high = difference["ci"]
    return (f"{100 * difference['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], "
            f"p {difference['mcnemar_p']:.2g} ({difference['count']})")


def intervention_differences_table(metrics: dict) -> list[str]:
    """Markdown: per group, each intervention's accuracy minus the own codes' on the same items."""
    groups = [(name, m["intervention_against_own"]) for name, m in metrics.items() if m.get("intervention_against_own")]
    if not groups:
        return []
    names = [k for k in INTERVENTIONS if k != "own"]
    lines = ["", "## How much does each intervention change the answers?", "",
             "Accuracy after the intervention minus with the model's own codes, on the same items (points): the "
             "paired difference, its 95 % paired-bootstrap interval, the exact McNemar p-value, items.", "",
             "| group | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for name, against in groups:
        lines.append(f"| {name} | " + " | ".join(paired_cell(against[k]) if k in against else "–" for k in names)
                     + " |")
    return lines


def depth_dependence_table(metrics: dict) -> list[str]:
    """Markdown: per group, the generated depth maps' error beside the training-set mean map's (eval/depth_dependence.py)."""
    groups = [(name, m["depth_dependence"]) for name, m in metrics.items() if m.get("depth_dependence")]
    if not groups:
        return []
    lines = ["", "## Do the generated depth maps follow the image?", "",
             "AbsRel against the true depth after a per-image scale and shift, of the model's own decoded depth map "
             "and of the training set's mean map on the same items; a ratio under 1 means the maps depend on the "
             "image.", "", "| group | generated | training mean map | ratio | items |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, d in groups:
        mean = f"{d['mean_map_absrel']:.3f}" if "mean_map_absrel" in d else "–"
        ratio = f"{d['ratio']:.2f}" if "ratio" in d else "–"
        lines.append(f"| {name} | {d['generated_absrel']:.3f} | {mean} | {ratio} | {d['count']} |")
    return lines


def write_report(out: Path, items: list[EvalItem], predictions: list[Prediction], rows: list[dict], metrics: dict,
                 examples_per_group: int = 6) -> Path:
    """report.md: the metrics table and one picture per group (image, mask vs reference, depth, verdict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Evaluation report", "", "Values in %; in brackets the 95 % Wilson interval where there is one.", "",
             "| group | metric | value | items |", "| --- | --- | ---: | ---: |"]
    for name, m in metrics.items():
        for key in ("accuracy", "single_pass_accuracy", "circular_accuracy", "ciou", "giou", "answer_exact"):
            if key in m:
                count = m.get("questions") if key == "circular_accuracy" else m.get("count", m.get("splits"))
                lines.append(f"| {name} | {key} | {100 * m[key]:.1f}{interval(m.get(f'{key}_ci'))} | {count} |")
    lines += baselines_table(metrics)
    lines += faithfulness_table(metrics)
    lines += intervention_differences_table(metrics)
    for diagnostic in EVAL_DIAGNOSTICS.values():
        lines += diagnostic.table(metrics)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group, []).append(i)
    for name, indices in groups.items():
        chosen = indices[:examples_per_group]
        fig, axes = plt.subplots(len(chosen), 3, figsize=(10, 3.2 * len(chosen)), squeeze=False)
        for row_axes, i in zip(axes, chosen):
            item, pred, row = items[i], predictions[i], rows[i]
            row_axes[0].imshow(item.image)
            verdict = (f"IoU {row['iou']:.2f}" if "iou" in row else ("right" if row["correct"] else "wrong"))
            # whole answers (a marker step is long), wrapped, left-aligned over the first two panels
            text = "\n".join([item.question[:90], *textwrap.wrap(f"ref: {item.answer}", 110),
                              *textwrap.wrap(f"got: {pred.text!r} | {verdict}", 110)])
            row_axes[0].set_title(text, fontsize=6, loc="left")
            overlay = item.image.astype(float) / 255
            if item.mask is not None or pred.mask is not None:
                tint = overlay.copy()
                if item.mask is not None:
                    tint[item.mask] = 0.5 * tint[item.mask] + 0.5 * np.array([0.0, 1.0, 0.0])
                if pred.mask is not None:
                    tint[pred.mask] = 0.5 * tint[pred.mask] + 0.5 * np.array([1.0, 0.0, 0.0])
                overlay = tint
            row_axes[1].imshow(overlay)
            row_axes[1].set_title("mask: predicted red, reference green" if item.task == "referring_seg" else "",
                                  fontsize=7)
            if pred.depth is not None:
                row_axes[2].imshow(pred.depth, cmap="magma")
                row_axes[2].set_title("generated depth tokens, decoded (bright = near)", fontsize=7)
            else:
                row_axes[2].text(0.5, 0.5, "no depth block", ha="center", va="center")
            for ax in row_axes:
                ax.axis("off")
        fig.tight_layout()
        picture = out / f"examples_{name}.png"
        fig.savefig(picture, dpi=80)
        plt.close(fig)
        lines += ["", f"## {name}", "", f"![{name}]({picture.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
