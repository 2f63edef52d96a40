"""The main job: the whole Perceptio workflow on one machine, no GPU, no downloads, at toy scale.

    python -m perceptio_dist.cli.demo [--quick] [--out DIR] [section.key=value ...]   (./run_demo.sh calls this)

The default folder is runs/toy_data, where the toy-spatial recipes (toy_spatial, preprocess_toy, vqvae_toy) find
the scenes, the depth tokenizer and the shards afterwards. The toy world is made so the relative-depth question can
be read by a tiny model (issue 16): a 128-px tile of 8x8 image tokens on the 8x8 depth grid, markers drawn as discs
in their letter's own colour, each in its own depth cell, four questions per scene.

Stages (each reuses what an earlier run finished; a marker file per stage says it is done):
  1. scenes      render training scenes and held-out scenes (other seeds) with pybullet
  2. tokenizer   train the depth VQ-VAE on the training scenes' exact depth
  3. shards      start a local Ray head (loopback, token auth), `ray job submit` the preprocessing, stop it
  4. train       the toy Perceptio on 2 CPU ranks with DeepSpeed ZeRO-3, a checkpoint midway, --resume auto
  5. ablation    the same model, data and budget without depth tokens (data.depth_tokens=false)
  6. eval        export both; score them on the held-out scenes (relative depth 3/4/5, referring cIoU)
                 and on the real HardBLINK files when ../shared/data/hardblink exists
  7. report      report.md: both models side by side, loss curves, example grids
Extra arguments are training overrides applied to both models (e.g. train.max_steps=300).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...parallel.distributed import free_port

ROOT = Path(__file__).resolve().parents[3]  # the repository
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class DemoSize:
    train_scenes: int
    heldout_scenes: int
    tokenizer_steps: int
    train_steps: int
    eval_limit: int | None  # items per benchmark group; None: all
    shard_size: int


FULL = DemoSize(train_scenes=1200, heldout_scenes=200, tokenizer_steps=600, train_steps=1500, eval_limit=200,
                shard_size=256)
QUICK = DemoSize(train_scenes=12, heldout_scenes=3, tokenizer_steps=20, train_steps=6, eval_limit=2, shard_size=8)


def _say(message: str) -> None:
    print(f"\n[demo] {message}", flush=True)


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """A stage's command with its output in a log file (tail shown if it fails)."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"[demo] failed ({proc.returncode}) after {time.time() - start:.0f}s: {' '.join(cmd[:4])} ...\n"
                 f"--- last lines of {log} ---\n{tail}")


def _mark(marker: Path, info: dict) -> None:
    marker.write_text(json.dumps(info, indent=1))


class Demo:
    def __init__(self, out: Path, size: DemoSize, overrides: list[str]):
        self.out, self.size, self.overrides = out, size, overrides
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def stage(self, name: str, fn) -> None:
        marker = self.out / f".{name}.done"
        if marker.exists():
            _say(f"{name}: done in an earlier run (delete {marker} to redo it)")
            return
        _say(f"{name} ... (output in {self.logs})")
        start = time.time()
        info = fn() or {}
        self.timings[name] = time.time() - start
        _mark(marker, {**info, "seconds": round(self.timings[name], 1)})
        _say(f"{name}: finished in {self.timings[name]:.0f}s")

    # ---------------------------------------------------------------- stages

    def scenes(self) -> dict:
        from ...preprocess.scenes.folders import write_scenes

        write_scenes(self.out / "scenes", self.size.train_scenes, seed=0)
        write_scenes(self.out / "heldout_scenes", self.size.heldout_scenes, seed=100_000)
        return {"train": self.size.train_scenes, "heldout": self.size.heldout_scenes}

    def tokenizer(self) -> dict:
        _run([str(BIN / "perceptio-vqvae"), "train", "--recipe", "vqvae_toy", f"output_dir={self.out / 'depth_vqvae'}",
              f"data.scenes={self.out / 'scenes'}", f"steps={self.size.tokenizer_steps}",
              f"warmup_steps={min(30, self.size.tokenizer_steps // 2)}",
              f"save_every={self.size.tokenizer_steps}"], self.logs / "tokenizer.log")
        return {"checkpoint": str(self.out / "depth_vqvae" / "tokenizer.safetensors")}

    def shards(self) -> dict:
        """A private Ray head on loopback; the preprocessing goes through `ray job submit` as on a cluster."""
        token = self.out / "ray_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
               "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        dashboard = free_port()
        job = [str(BIN / "perceptio-preprocess"), "--recipe", "preprocess_toy",
               f"sources.0.path={self.out / 'scenes'}", f"output_dir={self.out / 'shards'}",
               f"shard_size={self.size.shard_size}",
               f"depth_vqvae.checkpoint={self.out / 'depth_vqvae' / 'tokenizer.safetensors'}"]
        _run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
              "--include-dashboard=true", "--disable-usage-stats"], self.logs / "ray_start.log", env)
        try:
            # The job server refuses jobs until the head's dashboard agent has registered: seconds on an idle
            # machine, more than a minute on a loaded one.
            deadline = time.time() + 300
            while True:
                log = self.logs / "preprocess.log"
                proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                       "--", *job], cwd=ROOT, env=env, capture_output=True,
                                      text=True, stdin=subprocess.DEVNULL)
                log.write_text(proc.stdout + proc.stderr)
                if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
                    break
                time.sleep(3)
            if proc.returncode != 0:
                sys.exit(f"[demo] the preprocessing job failed; see {log}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        manifest = json.loads((self.out / "shards" / "manifest.json").read_text())
        return {"samples": manifest["num_samples"], "counts": manifest["counts"]}

    def _train(self, name: str, extra: list[str]) -> dict:
        run = self.out / name
        steps = self.size.train_steps
        cmd = [str(BIN / "perceptio-train"), "--nproc-per-node", "2", "--resume", "auto", "--recipe", "toy_spatial",
               f"train.max_steps={steps}", f"train.warmup_steps={min(50, steps // 3)}",
               f"checkpoint.save_every_steps={max(1, steps // 2)}",
               f"data.shards={self.out / 'shards'}", f"logging.output_dir={run}", "logging.wandb=offline",
               f"logging.log_every_steps={max(1, steps // 300)}",  # ~300 points per loss curve
               f"model.depth_vqvae.checkpoint={self.out / 'depth_vqvae' / 'tokenizer.safetensors'}",
               "logging.progress_bar=false", *extra, *self.overrides]
        _run(cmd, self.logs / f"{name}.log")
        summary = json.loads((run / "summary.json").read_text())
        return {"last_loss": summary["last_loss"], "steps": steps}

    def train(self) -> dict:
        return self._train("depth_model", [])

    def ablation(self) -> dict:
        return self._train("ablation", ["data.depth_tokens=false"])

    def evaluate(self) -> dict:
        from ...eval.benchmarks import DEFAULT_HARDBLINK
        from ...export import export_checkpoint

        results = {}
        for name in ("depth_model", "ablation"):
            checkpoints = self.out / name / "checkpoints"
            export = self.out / name / "export"
            export_checkpoint(checkpoints / (checkpoints / "latest").read_text().strip(), export)
            cmd = [sys.executable, "-m", "perceptio_dist.cli.eval", "--model", str(export), "--out",
                   str(self.out / name / "eval"), "--synthetic-scenes", str(self.out / "heldout_scenes"),
                   "--batch-size", "16"]
            if DEFAULT_HARDBLINK.exists():
                cmd += ["--benchmark", "hardblink"]
            if self.size.eval_limit:
                cmd += ["--limit", str(self.size.eval_limit)]
            _run(cmd, self.logs / f"eval_{name}.log")
            results[name] = json.loads((self.out / name / "eval" / "metrics.json").read_text())
        (self.out / "metrics.json").write_text(json.dumps(results, indent=1))
        return {}

    def report(self) -> dict:
        write_demo_report(self.out)
        return {}


def _loss_curves(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["loss", "loss/text", "loss/marker", "loss/mask", "loss/token", "loss/reconstruction"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, term in zip(axes.flat, terms):
        for name, style in (("depth_model", "-"), ("ablation", "--")):
            rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
            points = [(r["step"], r[term]) for r in rows if r.get(term) is not None]
            if points:
                ax.plot(*zip(*points), style, label=name)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if ax.lines:  # a term neither run logged has nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def paired_arms(out: Path) -> dict[str, dict]:
    """Per multiple-choice group, the depth model's accuracy minus the ablation's on the items both answered
    (their predictions.jsonl, matched by key): a paired difference (eval/intervals.py), as JSON."""
    from ...eval.intervals import paired_difference

    rows = {}
    for arm in ("depth_model", "ablation"):
        path = out / arm / "eval" / "predictions.jsonl"
        if not path.exists():
            return {}
        rows[arm] = {(r["group"], r["key"]): r["correct"] for r in map(json.loads, path.read_text().splitlines())
                     if "correct" in r}
    both: dict[str, list[tuple[bool, bool]]] = {}
    for (group, key), correct in sorted(rows["depth_model"].items()):
        if (group, key) in rows["ablation"]:
            both.setdefault(group, []).append((correct, rows["ablation"][(group, key)]))
    return {group: paired_difference([a for a, _ in pairs], [b for _, b in pairs]).to_json()
            for group, pairs in both.items()}


def write_demo_report(out: Path) -> Path:
    from ...eval.baselines import baselines_table
    from ...eval.report import faithfulness_table, interval, intervention_differences_table, paired_cell
    from .marker_step import marker_step_table

    metrics = json.loads((out / "metrics.json").read_text())
    paired = paired_arms(out)
    groups = sorted(set(metrics["depth_model"]) | set(metrics["ablation"]))
    lines = ["# Perceptio demo report", "",
             "Two toy-spatial Perceptio models trained on the same synthetic scenes, steps and seed: one answers after "
             "generating depth tokens (the spatial chain of thought), the ablation answers directly. Scores on "
             "held-out scenes (other seeds) and, where present, the real HardBLINK files. Chance: 1/3, 1/4, 1/5 "
             "for 3/4/5 points. Values in %, 95 % Wilson intervals in brackets; the last column is the depth model "
             "minus the ablation on the same items (points, 95 % paired-bootstrap interval, exact McNemar p, "
             "items).", "",
             "| benchmark | metric | with depth tokens | without (ablation) | items | depth model - ablation |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for group in groups:
        a, b = metrics["depth_model"].get(group, {}), metrics["ablation"].get(group, {})
        for key in ("accuracy", "ciou", "giou", "answer_exact"):
            if key in a or key in b:
                fa = f"{100 * a[key]:.1f}{interval(a.get(f'{key}_ci'))}" if key in a else "-"
                fb = f"{100 * b[key]:.1f}{interval(b.get(f'{key}_ci'))}" if key in b else "-"
                difference = paired_cell(paired[group]) if key == "accuracy" and group in paired else "–"
                lines.append(f"| {group} | {key} | {fa} | {fb} | {a.get('count', a.get('splits', ''))} | "
                             f"{difference} |")

    for name, label in (("depth_model", "Depth model"), ("ablation", "Ablation")):
        lines += [line.replace("## Baselines", f"## {label}: baselines") for line in baselines_table(metrics[name])]
    lines += [line.replace("## Does", "## Depth model: does") for line in faithfulness_table(metrics["depth_model"])]
    lines += [line.replace("## How much", "## Depth model: how much")
              for line in intervention_differences_table(metrics["depth_model"])]
    for name, label in (("depth_model", "Depth model"), ("ablation", "Ablation")):
        lines += [line.replace("## Does", f"## {label}: does") for line in marker_step_table(metrics[name])]
    timings = {p.name[1:-5]: json.loads(p.read_text()).get("seconds") for p in sorted(out.glob(".*.done"))}
    lines += ["", f"Stage times (s, this run or the one that made them): {json.dumps(timings)}", "",
              "## Loss curves", "", f"![losses]({_loss_curves(out).name})", ""]
    for name in ("depth_model", "ablation"):
        lines += [f"## Examples: {name}", ""]
        for picture in sorted((out / name / "eval").glob("examples_*.png")):
            lines.append(f"![{picture.stem}]({picture.relative_to(out)})")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
