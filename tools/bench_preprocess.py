"""Ray preprocessing throughput with 1 vs 2 workers per stage, on the same rendered scenes, in one run.

    python tools/bench_preprocess.py [--scenes 64]

Renders scenes once (320x240), then runs the real job (python -m ray_jobs.preprocess, a private local
Ray instance) twice into fresh folders: decode tasks and depth actors at concurrency 1, then 2.
Reports records per second of the pipeline itself (Ray start-up excluded) and the ratio of the
2-worker run to the 1-worker baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perceptio_dist.preprocess.scenes.folders import write_scenes  # noqa: E402


def run(scenes: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "ray_jobs.preprocess", "--config", "preprocess_tiny", f"sources.0.path={scenes}",
           f"output_dir={out}", "shard_size=32", f"decode_concurrency={workers}", f"teacher.concurrency={workers}",
           "teacher.num_cpus=0.25", "tokenizer_num_cpus=0.25", "depth_vqvae.checkpoint=null"]
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith('{"output_dir"')][-1]
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scenes = Path(tmp) / "scenes"
        write_scenes(scenes, args.scenes, progress=False)
        results = {}
        for workers in (1, 2):
            r = run(scenes, Path(tmp) / f"out{workers}", workers)
            results[workers] = {"records": r["records_processed"], "pipeline_seconds": r["pipeline_seconds"],
                                "total_seconds": r["total_seconds"],
                                "records_per_s": round(r["records_processed"] / r["pipeline_seconds"], 2)}
    base = results[1]["records_per_s"]
    for r in results.values():
        r["ratio_vs_1_worker"] = round(r["records_per_s"] / base, 2)
    print(json.dumps({f"workers={w}": r for w, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
