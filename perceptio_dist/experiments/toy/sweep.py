"""A sweep: train a list of configurations on a short budget, evaluate each on held-out scenes, write one table.

    perceptio-sweep --sweep sweep.yaml --out runs/sweep        (cli/sweep.py)

The sweep file names the shared inputs and the configurations; each configuration is a list of training
overrides on one recipe, trained with depth tokens and (unless ``ablation: false``) without them::

    recipe: toy_spatial                        # the training recipe every configuration starts from
    heldout_scenes: runs/toy_data/heldout_scenes
    nproc_per_node: 2
    eval_limit: 150                            # relative-depth items per group (null: all)
    common: [train.max_steps=600]              # overrides of every configuration
    configurations:
      - name: base
      - name: depth-ordered codes
        overrides: [model.tokens.code_embedding_init=depth_order]
        ablation: false                        # the ablation does not see codes: reuse another row's
      - name: 4x4 grid, K 32
        overrides: [model.tokens.depth_grid=4, data.shards=runs/toy4/shards, model.depth_vqvae.checkpoint=...]

``seeds: [1, 2, 3]`` trains every configuration (both models) once per seed, the seed set as both the training
seed (``train.seed``: initialisation) and the data-order seed (``data.seed``), each in its own folder
(``<configuration>/seed_<s>/``); the table then gives each seed's row and the mean ± standard deviation across the
seeds. Without ``seeds`` each configuration trains once with its recipe's seeds.

Levers that change the data (marker style, grid, K, questions per scene) point ``data.shards`` and the
tokenizer at shards prepared for them. Each (configuration, model) trains in its own folder and is skipped
when its result exists, so a sweep that stops resumes. The table (sweep.md, sweep.json) gives per row the
held-out accuracy of both models for 3/4/5 points, the depth model's accuracy with random and ground-truth
codes in its chain, chain consistency, and the seconds it took.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ...config import ConfigError

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[3]  # the repository
GROUPS = ("synthetic_depth_3", "synthetic_depth_4", "synthetic_depth_5")


@dataclass
class SweepEntry:
    name: str
    overrides: list[str] = field(default_factory=list)
    ablation: bool = True  # also train the same configuration without depth tokens

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_").lower() or "unnamed"


@dataclass
class Sweep:
    recipe: str
    heldout_scenes: str
    configurations: list[SweepEntry]
    common: list[str] = field(default_factory=list)
    nproc_per_node: int = 2
    eval_limit: Optional[int] = 150
    eval_batch_size: int = 16
    seeds: list[int] = field(default_factory=list)  # train.seed and data.seed of each run; []: the recipe's


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file, checked: every problem named by its field, before anything trains."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Sweep file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Sweep file {path}: expected a mapping with recipe, heldout_scenes, configurations.")
    known = set(Sweep.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"Sweep file {path}: unknown field(s) {unknown}; fields are {sorted(known)}.")
    for name in ("recipe", "heldout_scenes", "configurations"):
        if not data.get(name):
            raise ConfigError(f"Sweep file {path}: '{name}' is required.")
    entries = []
    for i, raw in enumerate(data["configurations"]):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"Sweep file {path}: configurations[{i}] needs a name (and optional overrides, ablation).")
        bad = sorted(set(raw) - set(SweepEntry.__dataclass_fields__))
        if bad:
            raise ConfigError(f"Sweep file {path}: configurations[{i}] has unknown field(s) {bad}.")
        entries.append(SweepEntry(str(raw["name"]), [str(o) for o in raw.get("overrides") or []],
                                  bool(raw.get("ablation", True))))
    slugs = [e.slug for e in entries]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"Sweep file {path}: configuration names must differ (folders {slugs}).")
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"Sweep file {path}: seeds must be a list of distinct integers, got {seeds!r}.")
    sweep = Sweep(**{**data, "configurations": entries, "seeds": seeds})
    scenes = Path(sweep.heldout_scenes)
    if not scenes.is_absolute():
        scenes = (path.parent / scenes) if (path.parent / scenes).exists() else (ROOT / scenes)
    if not scenes.exists():
        raise ConfigError(f"Sweep file {path}: heldout_scenes {sweep.heldout_scenes} does not exist "
                          "(render them with perceptio-scenes --seed 100000 ...).")
    sweep.heldout_scenes = str(scenes.resolve())
    # Every configuration's recipe and overrides load and validate now, not after an hour of training.
    from ...config.training import load_config

    for entry in entries:
        try:
            load_config(sweep.recipe, [*sweep.common, *entry.overrides])
        except ConfigError as exc:
            raise ConfigError(f"Sweep configuration {entry.name!r}: {exc}") from None
    return sweep


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd[:6])} ...; last lines of {log}:\n"
                           f"{log.read_text()[-2000:]}")


def train_and_evaluate(sweep: Sweep, overrides: list[str], folder: Path) -> dict:
    """One model: train (resuming), export, evaluate on the held-out scenes; its metrics.json."""
    result = folder / "eval" / "metrics.json"
    if result.exists():
        return json.loads(result.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _run([str(BIN / "perceptio-train"), "--nproc-per-node", str(sweep.nproc_per_node), "--resume", "auto",
          "--recipe", sweep.recipe, *sweep.common, *overrides, f"logging.output_dir={folder / 'run'}",
          "logging.wandb=disabled", "logging.progress_bar=false", "checkpoint.save_every_steps=0"],
         folder / "train.log")
    seconds = time.time() - start
    timing = folder / "train_seconds.json"  # a rerun after a finished training resumes in seconds: keep the first
    if timing.exists():
        seconds = json.loads(timing.read_text())["seconds"]
    else:
        timing.write_text(json.dumps({"seconds": seconds}))
    from ...export import export_checkpoint

    checkpoints = folder / "run" / "checkpoints"
    export_checkpoint(checkpoints / (checkpoints / "latest").read_text().strip(), folder / "export")
    cmd = [sys.executable, "-m", "perceptio_dist.cli.eval", "--model", str(folder / "export"), "--out",
           str(folder / "eval"), "--synthetic-scenes", sweep.heldout_scenes, "--batch-size",
           str(sweep.eval_batch_size)]
    if sweep.eval_limit:
        cmd += ["--limit", str(sweep.eval_limit)]
    _run(cmd, folder / "eval.log")
    metrics = json.loads(result.read_text())
    metrics["train_seconds"] = seconds
    result.write_text(json.dumps(metrics, indent=1))
    return metrics


def run_configuration(sweep: Sweep, entry: SweepEntry, folder: Path, seed: Optional[int]) -> dict:
    """Both models of one configuration at one seed (None: the recipe's seeds): {"depth": ..., "ablation": ...}."""
    overrides = [*entry.overrides, *([] if seed is None else [f"train.seed={seed}", f"data.seed={seed}"])]
    run = {"depth": train_and_evaluate(sweep, overrides, folder / "depth_model")}
    if entry.ablation:
        run["ablation"] = train_and_evaluate(sweep, [*overrides, "data.depth_tokens=false"], folder / "ablation")
    return run


def run_sweep(sweep: Sweep, out: Path, progress=print) -> list[dict]:
    rows = []
    for i, entry in enumerate(sweep.configurations):
        progress(f"[sweep] {i + 1}/{len(sweep.configurations)} {entry.name}")
        row = {"name": entry.name, "overrides": entry.overrides}
        if sweep.seeds:
            row["seeds"] = [{"seed": seed, **run_configuration(sweep, entry, out / entry.slug / f"seed_{seed}", seed)}
                            for seed in sweep.seeds]
        else:
            row.update(run_configuration(sweep, entry, out / entry.slug, None))
        rows.append(row)
        write_table(sweep, rows, out)
    return rows


def _pct(metrics: dict | None, group: str, key: str = "accuracy") -> str:
    m = (metrics or {}).get(group, {})
    return "–" if m.get(key) is None else f"{100 * m[key]:.1f}"


def _intervention(metrics: dict, group: str, name: str) -> str:
    value = metrics.get(group, {}).get("interventions", {}).get(name)
    return "–" if value is None else f"{100 * value:.1f}"


def table_lines(sweep: Sweep, rows: list[dict]) -> list[str]:
    common = " ".join(sweep.common) or "none"
    lines = [f"Recipe `{sweep.recipe}`, common overrides `{common}`; held-out scenes {sweep.heldout_scenes} "
             f"(at most {sweep.eval_limit or 'all'} items per group). Accuracy (%) on held-out relative-depth "
             "questions with 3 / 4 / 5 points: the depth model, the ablation, the depth model with random and with "
             "ground-truth codes in its chain (3 points), its chain consistency (3 points), the markers whose cell its "
             "marker step names right / names for any letter and the markers whose nearness it names right (3 points; "
             "experiments/toy/marker_step.py; – : no cells in the step), its depth maps' AbsRel over the training mean "
             "map's (3 points; under 1: the maps follow the image), training seconds.", "",
             "| configuration | depth 3 / 4 / 5 | ablation 3 / 4 / 5 | random codes | ground-truth codes | "
             "consistency | marker cells right / found / nearness right | map / mean AbsRel | train s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines += seed_lines(row) if "seeds" in row else [result_line(row["name"], row["depth"], row.get("ablation"))]
    return lines


def result_line(name: str, d: dict, a: dict | None) -> str:
    """One table row: a configuration's depth model ``d`` and ablation ``a`` (None: not trained)."""
    g3 = GROUPS[0]
    consistency = d.get(g3, {}).get("chain_consistency")
    ratio = (d.get(g3, {}).get("depth_dependence") or {}).get("ratio")
    return (f"| {name} | {' / '.join(_pct(d, g) for g in GROUPS)} | "
            f"{' / '.join(_pct(a, g) for g in GROUPS) if a else 'not trained'} | {_intervention(d, g3, 'random')} | "
            f"{_intervention(d, g3, 'ground_truth')} | "
            f"{'–' if consistency is None else f'{100 * consistency:.0f}'} | {_pct(d, g3, 'marker_cells')} / "
            f"{_pct(d, g3, 'marker_found')} / {_pct(d, g3, 'marker_nearness')} | "
            f"{'–' if ratio is None else f'{ratio:.2f}'} | "
            f"{d.get('train_seconds', 0) + (a or {}).get('train_seconds', 0):.0f} |")


def _mean_sd(values: list[float]) -> str:
    """'61.3 ± 4.2' in percent: the mean and the sample standard deviation across seeds ('–' without values)."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def seed_lines(row: dict) -> list[str]:
    """A seeded configuration: one table row per seed, then the mean ± standard deviation across its seeds of the
    accuracies (the other columns are per seed)."""
    runs = row["seeds"]
    lines = [result_line(f"{row['name']}, seed {run['seed']}", run["depth"], run.get("ablation")) for run in runs]
    accuracies = {model: {g: [run[model][g]["accuracy"] for run in runs
                              if run.get(model, {}).get(g, {}).get("accuracy") is not None] for g in GROUPS}
                  for model in ("depth", "ablation")}
    ablation = " / ".join(_mean_sd(accuracies["ablation"][g]) for g in GROUPS) \
        if any("ablation" in run for run in runs) else "not trained"
    lines.append(f"| {row['name']}, mean ± sd of {len(runs)} seeds | "
                 f"{' / '.join(_mean_sd(accuracies['depth'][g]) for g in GROUPS)} | {ablation} | | | | | | |")
    return lines


def write_table(sweep: Sweep, rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    path = out / "sweep.md"
    path.write_text("\n".join(["# Sweep", "", *table_lines(sweep, rows), ""]))
    return path
