"""perceptio-demo (./run_demo.sh): the main job, perceptio_dist/experiments/toy/demo.py, from the command line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ..experiments.toy.demo import BIN, FULL, QUICK, ROOT, Demo, _say


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceptio-demo", description="The main job: the whole Perceptio workflow at toy scale on this machine.")
    parser.add_argument("--quick", action="store_true", help="a few minutes: same stages, fewer scenes and steps")
    parser.add_argument("--out", default=None,
                        help="demo folder (default runs/toy_data, where the toy-spatial recipes look; --quick: runs/demo_quick)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="training overrides (both models)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    out = Path(args.out or (ROOT / "runs" / ("demo_quick" if args.quick else "toy_data"))).resolve()
    if shutil.which("perceptio-train", path=str(BIN)) is None:
        sys.exit("[demo] perceptio-train is not installed in this environment: run ./run_demo.sh")
    demo = Demo(out, size, args.overrides)
    start = time.time()
    for name in ("scenes", "tokenizer", "shards", "train", "ablation", "evaluate", "report"):
        demo.stage(name, getattr(demo, name))
    metrics = json.loads((out / "metrics.json").read_text())
    _say(f"all stages done in {time.time() - start:.0f}s; report: {out / 'report.md'}")
    for group in sorted(metrics["depth_model"]):
        a, b = metrics["depth_model"][group], metrics["ablation"].get(group, {})
        key = "accuracy" if "accuracy" in a else "ciou"
        if key in b:
            print(f"  {group:24s} {key:8s} depth tokens {100 * a[key]:5.1f}   ablation {100 * b[key]:5.1f}")


if __name__ == "__main__":
    main()
