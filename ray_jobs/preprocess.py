"""Preprocessing as a Ray job: raw sources -> webdataset shards + manifest.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.preprocess --config perceptio_dist/recipes/preprocess_tiny.yaml output_dir=/abs/path

Without a cluster, `python -m ray_jobs.preprocess ...` starts a local Ray instance. Paths in the
config should be absolute when submitting (the job runs in a copy of the working directory).

Pipeline (Ray Data): records are planned into shards on the driver (deterministic per task), shards
already complete from an earlier run are skipped, the rest flow through
decode/validate (tasks) -> depth: ground truth or Depth Anything V2 (actor pool, `teacher.concurrency`
actors with `teacher.num_gpus` each) -> VQ-VAE codes (actor) -> the driver writes each shard as soon as its
last row arrives (no shuffle: the stages stream and overlap, and the writes overlap with them).
Bad records go to quarantine with their reason; the job never fails on data. Progress: Ray Data's
progress bars in the job log and the Ray dashboard.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from perceptio_dist.config import ConfigError
from perceptio_dist.preprocess.config import PreprocessConfig, check_preprocess_paths, load_preprocess_config
from perceptio_dist.preprocess.stages import CodeStage, DepthStage, batch_rows, decode_batch, plan_shards, write_shard_rows
from perceptio_dist.data.shards import MANIFEST, QUARANTINE, file_sha256, shard_complete, sidecar_path
from perceptio_dist.preprocess.sources import iter_source

log = logging.getLogger("ray_jobs.preprocess")


def _check_paths(cfg: PreprocessConfig) -> None:
    """Paths were resolved when the config was loaded; here they must exist (the teacher may be a cache id)."""
    check_preprocess_paths(cfg)
    teacher = cfg.teacher.pretrained_path
    if teacher and not Path(teacher).exists() and not _in_hf_cache(teacher):
        raise ConfigError(f"Config error at 'teacher.pretrained_path': {teacher} is neither a local folder nor a "
                          "model in the local Hugging Face cache (nothing is downloaded).")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def identities(cfg: PreprocessConfig) -> dict:
    from perceptio_dist.teachers.depth_anything import weights_identity

    teacher = None
    if cfg.teacher.pretrained_path:
        path = Path(cfg.teacher.pretrained_path)
        teacher = (f"depth_anything:{path.name}:{weights_identity(path)}" if path.exists()
                   else f"depth_anything:hf-cache:{cfg.teacher.pretrained_path}")
    tokenizer = (f"vqvae:{Path(cfg.depth_vqvae.checkpoint).name}:{file_sha256(Path(cfg.depth_vqvae.checkpoint))[:16]}"
                 if cfg.depth_vqvae.checkpoint else f"vqvae:random(seed={cfg.vqvae_seed})")
    return {"teacher": teacher, "ground_truth_depth": cfg.teacher.use_ground_truth, "depth_tokenizer": tokenizer}


def run_pipeline(cfg: PreprocessConfig, pending, out: Path) -> None:
    import ray

    items = [{"shard": p.name, "record": json.dumps(r.to_dict())} for p in pending for r in p.records]
    ds = ray.data.from_items(items)
    ds = ds.map_batches(decode_batch, fn_kwargs={"max_image_side": cfg.max_image_side}, batch_size=16,
                        batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency))
    ds = ds.map_batches(
        DepthStage, batch_format="numpy", batch_size=cfg.teacher.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.teacher.concurrency),
        num_gpus=cfg.teacher.num_gpus, num_cpus=cfg.teacher.num_cpus,
        fn_constructor_kwargs=dict(out_size=cfg.depth_vqvae.input_size, teacher_path=cfg.teacher.pretrained_path,
                                   input_size=cfg.teacher.input_size, use_ground_truth=cfg.teacher.use_ground_truth,
                                   batch_size=cfg.teacher.batch_size),
    )
    ds = ds.map_batches(
        CodeStage, batch_format="numpy", batch_size=64, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.tokenizer_num_cpus,
        fn_constructor_kwargs=dict(vqvae_config=_vqvae_arch(cfg), num_codes=cfg.tokens.num_depth_codes,
                                   grid=cfg.tokens.depth_grid, checkpoint=cfg.depth_vqvae.checkpoint,
                                   seed=cfg.vqvae_seed),
    )
    # Every record yields one row (a bad one carries its error), so a shard is complete when its planned count of
    # rows has arrived. Rows stream in roughly input order, so only a few shards are partly buffered at a time.
    expected = {p.name: len(p.records) for p in pending}
    buffered: dict[str, list[dict]] = {}
    written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in batch_rows(batch):
            rows = buffered.setdefault(row["shard"], [])
            rows.append(row)
            if len(rows) == expected[row["shard"]]:
                write_shard_rows(buffered.pop(row["shard"]), str(out))
                written += 1
    if buffered:
        raise RuntimeError(f"the pipeline lost rows of shards {sorted(buffered)[:5]}: planned counts not reached")
    log.info("wrote %d shards", written)


def _vqvae_arch(cfg: PreprocessConfig) -> dict:
    from dataclasses import asdict

    arch = asdict(cfg.depth_vqvae)
    arch["checkpoint"] = None
    return arch


def write_manifest(cfg: PreprocessConfig, plans, out: Path, elapsed: float) -> dict:
    from dataclasses import asdict

    shards, quarantine = [], []
    per_task: dict[str, int] = {}
    per_source: dict[str, int] = {}
    chain: dict[str, dict[str, int]] = {}  # per task: samples, with_seg, with_depth (shards that recorded them)
    for plan in plans:
        stats = json.loads(sidecar_path(out, plan.name).read_text())
        shards.append({"path": f"{plan.name}.tar", "task": plan.task, "num_samples": stats["num_samples"],
                       "sha256": stats["sha256"], "bytes": stats.get("bytes"), "keys": stats["keys"]})
        per_task[plan.task] = per_task.get(plan.task, 0) + stats["num_samples"]
        if "chain" in stats:  # shards written before the chain was recorded have no counts
            entry = chain.setdefault(plan.task, {"samples": 0, "with_seg": 0, "with_depth": 0})
            entry["samples"] += stats["num_samples"]
            entry["with_seg"] += stats["chain"]["with_seg"]
            entry["with_depth"] += stats["chain"]["with_depth"]
        for source, n in stats["sources"].items():
            per_source[source] = per_source.get(source, 0) + n
        quarantine += stats["quarantined"]
    with open(out / QUARANTINE, "w") as f:
        for entry in quarantine:
            f.write(json.dumps(entry) + "\n")
    manifest = {
        "format": "perceptio-shards-v1",
        "split": cfg.split,
        "num_samples": sum(per_task.values()),
        "counts": {"task": per_task, "source": per_source},
        "chain": chain,
        "quarantined": len(quarantine),
        "depth": {"size": cfg.depth_vqvae.input_size, "num_codes": cfg.tokens.num_depth_codes,
                  "grid": cfg.tokens.depth_grid},
        "identities": identities(cfg),
        "shards": shards,
        "config": asdict(cfg),
        "seconds": round(elapsed, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def preprocess(cfg: PreprocessConfig) -> dict:
    start = time.perf_counter()
    _check_paths(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = [record for src in cfg.sources for record in iter_source(src)]
    if cfg.split == "train" and any(r.split == "eval" for r in records):
        raise ConfigError("Config error at 'sources': evaluation-only records in a train job.")
    plans = plan_shards(records, cfg.shard_size)
    pending = [p for p in plans if not shard_complete(out, p.name, p.plan)]
    log.info("%d records -> %d shards (%d already complete, %d to write) in %s",
             len(records), len(plans), len(plans) - len(pending), len(pending), out)
    pipeline_start = time.perf_counter()
    if pending:
        import ray

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):  # submitted with `ray job submit`, or pointed at a cluster
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
            else:  # a private local instance on loopback only
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
        pipeline_start = time.perf_counter()  # Ray is up: from here on it is the pipeline itself
        run_pipeline(cfg, pending, out)
    pipeline_seconds = time.perf_counter() - pipeline_start
    manifest = write_manifest(cfg, plans, out, time.perf_counter() - start)
    log.info("manifest: %d samples %s, %d quarantined, %.1fs", manifest["num_samples"], manifest["counts"]["task"],
             manifest["quarantined"], manifest["seconds"])
    print(json.dumps({"output_dir": str(out), "num_samples": manifest["num_samples"],
                      "counts": manifest["counts"], "quarantined": manifest["quarantined"],
                      "shards_written": len(pending), "shards_skipped": len(plans) - len(pending),
                      "records_processed": sum(len(p.records) for p in pending),
                      "pipeline_seconds": round(pipeline_seconds, 2), "total_seconds": manifest["seconds"]}),
          flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ray_jobs.preprocess", description="Raw sources -> webdataset shards.")
    parser.add_argument("--config", required=True, help="a preprocessing recipe (shipped name or yaml path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preprocess(load_preprocess_config(args.config, args.overrides))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
