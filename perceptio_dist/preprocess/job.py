"""The preprocessing job: raw sources -> webdataset shards + manifest, as a Ray Data pipeline.

    perceptio-preprocess --recipe preprocess_tiny output_dir=/abs/path           # a private local Ray
    ray job submit --address http://HEAD:8265 -- perceptio-preprocess --recipe preprocess_8b_teacher

Paths in the recipe should be absolute when submitting (the job may run in another working directory).

Two kinds of run:
* from sources (``sources``): records are planned into shards on the driver (deterministic per task), then
  decode/validate (tasks) -> depth: ground truth or Depth Anything V2 (actor pool, ``teacher.concurrency``
  actors with ``teacher.num_gpus`` each) -> VQ-VAE codes (actor; skipped when ``depth_codes`` is false: a
  teacher pass) -> the driver writes each shard as soon as its last row arrives;
* a code pass (``from_shards``): the samples of a teacher pass, their stored depth maps included, get their
  codes (actor) and are written again; the teacher is not run.

A shard already complete from an earlier run is kept only when it was made from the same records by the same
producer (tokenizer and teacher identities, answer format, the content-shaping fields of the recipe); any other
is rebuilt. Bad records go to quarantine with their reason; the job never fails on data. Progress: Ray Data's
progress bars in the job log and the Ray dashboard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..config import ConfigError
from ..data.shards import MANIFEST, QUARANTINE, read_manifest, read_shard, shard_complete, sidecar_path
from ..model.depth_vqvae import tokenizer_identity
from .config import PreprocessConfig, check_preprocess_paths, content_fields
from .records import ANSWER_FORMAT
from .sources import iter_source
from .stages import (CodeStage, DepthStage, ShardPlan, batch_rows, decode_batch, plan_shards,
                     write_shard_rows)

log = logging.getLogger("perceptio_dist.preprocess.job")


def _check_paths(cfg: PreprocessConfig) -> None:
    """Paths were resolved when the config was loaded; here they must exist (the teacher may be a cache id)."""
    check_preprocess_paths(cfg)
    teacher = cfg.teacher.pretrained_path
    if teacher and not cfg.from_shards and not Path(teacher).exists() and not _in_hf_cache(teacher):
        raise ConfigError(f"Config error at 'teacher.pretrained_path': {teacher} is neither a local folder nor a "
                          "model in the local Hugging Face cache (nothing is downloaded).")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def identities(cfg: PreprocessConfig) -> dict:
    """Who made the shards of this run: the teacher and the depth tokenizer, by identity (not by path)."""
    from ..teachers.depth_anything import weights_identity

    teacher = None
    if cfg.teacher.pretrained_path:
        path = Path(cfg.teacher.pretrained_path)
        teacher = (f"depth_anything:{path.name}:{weights_identity(path)}" if path.exists()
                   else f"depth_anything:hf-cache:{cfg.teacher.pretrained_path}")
    tokenizer = tokenizer_identity(cfg.depth_vqvae.checkpoint) if cfg.depth_codes else None
    return {"teacher": teacher, "ground_truth_depth": cfg.teacher.use_ground_truth, "depth_tokenizer": tokenizer}


def producer(cfg: PreprocessConfig, ids: dict, made_from: dict | None = None) -> dict:
    """What a shard's contents depend on besides its records: recorded in its marker, compared on a rerun.

    ``made_from``: a code pass's teacher shard (its producer and checksum), so a new teacher pass rebuilds the codes."""
    contents = json.dumps({"fields": content_fields(cfg), "made_from": made_from}, sort_keys=True)
    return {"depth_tokenizer": ids["depth_tokenizer"],
            "teacher": (made_from or {}).get("producer", {}).get("teacher", ids["teacher"]),
            "answer_format": ANSWER_FORMAT,
            "contents": hashlib.sha256(contents.encode()).hexdigest()[:16]}


def run_pipeline(cfg: PreprocessConfig, pending, out: Path, producers: dict[str, dict]) -> None:
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
    if cfg.depth_codes:
        ds = _with_codes(ds, cfg)
    _write_as_rows_arrive(ds, {p.name: len(p.records) for p in pending}, out, producers)


def _with_codes(ds, cfg: PreprocessConfig):
    import ray

    return ds.map_batches(
        CodeStage, batch_format="numpy", batch_size=64, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.tokenizer_num_cpus,
        fn_constructor_kwargs=dict(vqvae_config=_vqvae_arch(cfg), num_codes=cfg.tokens.num_depth_codes,
                                   grid=cfg.tokens.depth_grid, checkpoint=cfg.depth_vqvae.checkpoint,
                                   seed=cfg.vqvae_seed),
    )


def _write_as_rows_arrive(ds, expected: dict[str, int], out: Path, producers: dict[str, dict]) -> None:
    # Every record yields one row (a bad one carries its error), so a shard is complete when its planned count of
    # rows has arrived. Rows stream in roughly input order, so only a few shards are partly buffered at a time.
    # A block that Ray ran again (its node was lost after part of its output had arrived) may deliver a record
    # twice: rows are kept by record key, so a shard never counts one twice nor closes early; a record of a shard
    # already written is dropped.
    buffered: dict[str, dict[str, dict]] = {}
    done: set[str] = set()
    written = duplicates = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in batch_rows(batch):
            shard, key = row["shard"], json.loads(row["record"])["key"]
            rows = buffered.setdefault(shard, {}) if shard not in done else None
            if rows is None or key in rows:
                duplicates += 1
                continue
            rows[key] = row
            if len(rows) == expected[shard]:
                write_shard_rows(list(buffered.pop(shard).values()), str(out), producers[shard])
                done.add(shard)
                written += 1
    if buffered:
        raise RuntimeError(f"the pipeline lost rows of shards {sorted(buffered)[:5]}: planned counts not reached")
    log.info("wrote %d shards%s", written, f" ({duplicates} records delivered twice, kept once)" if duplicates else "")


def _vqvae_arch(cfg: PreprocessConfig) -> dict:
    from dataclasses import asdict

    arch = asdict(cfg.depth_vqvae)
    arch["checkpoint"] = None
    return arch


def run_code_pass(cfg: PreprocessConfig, pending: list[ShardPlan], out: Path, producers: dict[str, dict]) -> None:
    """The teacher-pass shards in ``pending``, read one task per shard, with their codes added."""
    import ray

    source = Path(cfg.from_shards)
    ds = ray.data.from_items([{"shard": p.name, "tar": str(source / f"{p.name}.tar")} for p in pending])
    ds = ds.flat_map(teacher_shard_rows, num_cpus=1)
    ds = _with_codes(ds, cfg)
    _write_as_rows_arrive(ds, {p.name: len(p.records) for p in pending}, out, producers)


def teacher_shard_rows(item: dict) -> list[dict]:
    """The stored samples of one teacher-pass shard as pipeline rows (the stages' row format, depth map included)."""
    rows = []
    for sample in read_shard(Path(item["tar"])):
        record = {k: v for k, v in sample.info.items() if k != "image_size"}
        rows.append({"shard": item["shard"], "record": json.dumps(record), "image": sample.image,
                     "image_ext": sample.image_ext, "mask": sample.mask_png, "gt_depth": b"",
                     "depth": sample.depth_npy, "error": ""})
    return rows


def plan_code_pass(cfg: PreprocessConfig) -> tuple[list[ShardPlan], dict, dict[str, dict]]:
    """A code pass's shards are the teacher pass's, one for one: (plans, the teacher pass's manifest, each shard's
    teacher-pass entry)."""
    source = Path(cfg.from_shards)
    manifest = read_manifest(source)
    if manifest["identities"].get("depth_tokenizer") is not None:
        log.warning("%s already holds codes (made by %s); the code pass replaces them in %s", source,
                    manifest["identities"]["depth_tokenizer"], cfg.output_dir)
    if manifest["depth"]["size"] != cfg.depth_vqvae.input_size:
        raise ConfigError(f"Config error at 'from_shards': its depth maps are {manifest['depth']['size']} px, the "
                          f"depth tokenizer takes {cfg.depth_vqvae.input_size} px (depth_vqvae.input_size). Run the "
                          "teacher pass with the same depth_vqvae.input_size.")
    plans, entries = [], {}
    for entry in manifest["shards"]:
        name = entry["path"][: -len(".tar")]
        plans.append(ShardPlan(name, entry["task"], [_KeyOnly(k) for k in entry["keys"]]))
        entries[name] = entry
    return plans, manifest, entries


class _KeyOnly:
    """A planned sample of a code pass: only its key is known before the shard is read."""

    def __init__(self, key: str):
        self.key = key


def write_manifest(cfg: PreprocessConfig, plans, out: Path, elapsed: float, ids: dict) -> dict:
    from dataclasses import asdict

    shards, quarantine = [], []
    work: dict[str, dict[str, int]] = {}  # per stage: records processed per node (shards written before: none)
    per_task: dict[str, int] = {}
    per_source: dict[str, int] = {}
    chain: dict[str, dict[str, int]] = {}  # per task: samples, with_seg, with_depth (shards that recorded them)
    for plan in plans:
        stats = json.loads(sidecar_path(out, plan.name).read_text())
        shards.append({"path": f"{plan.name}.tar", "task": plan.task, "num_samples": stats["num_samples"],
                       "sha256": stats["sha256"], "bytes": stats.get("bytes"), "keys": stats["keys"],
                       "producer": stats.get("producer"), "nodes": stats.get("nodes", {})})
        for stage, per_node in stats.get("nodes", {}).items():
            totals = work.setdefault(stage, {})
            for node, n in per_node.items():
                totals[node] = totals.get(node, 0) + n
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
                  "grid": cfg.tokens.depth_grid, "codes": cfg.depth_codes},
        "identities": ids,
        "records_per_node": work,
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
    if cfg.from_shards and out == Path(cfg.from_shards).resolve():
        raise ConfigError("Config error at 'output_dir': a code pass writes new shards beside the teacher pass's; "
                          "give it another folder than from_shards.")
    out.mkdir(parents=True, exist_ok=True)
    ids = identities(cfg)
    if cfg.from_shards:
        plans, teacher_manifest, entries = plan_code_pass(cfg)
        ids = {**ids, "teacher": teacher_manifest["identities"].get("teacher"),
               "ground_truth_depth": teacher_manifest["identities"].get("ground_truth_depth")}
        producers = {p.name: producer(cfg, ids, {"producer": entries[p.name].get("producer"),
                                                 "sha256": entries[p.name]["sha256"]}) for p in plans}
    else:
        records = [record for src in cfg.sources for record in iter_source(src)]
        if cfg.split == "train" and any(r.split == "eval" for r in records):
            raise ConfigError("Config error at 'sources': evaluation-only records in a train job.")
        plans = plan_shards(records, cfg.shard_size)
        producers = {p.name: producer(cfg, ids) for p in plans}
    pending = [p for p in plans if not shard_complete(out, p.name, p.plan, producers[p.name])]
    log.info("%d shards (%d already complete, %d to write) in %s", len(plans), len(plans) - len(pending),
             len(pending), out)
    pipeline_start = time.perf_counter()
    if pending:
        import ray

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):  # submitted with `ray job submit`, or pointed at a cluster
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
            else:  # a private local instance on loopback only
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
        pipeline_start = time.perf_counter()  # Ray is up: from here on it is the pipeline itself
        if cfg.from_shards:
            run_code_pass(cfg, pending, out, producers)
        else:
            run_pipeline(cfg, pending, out, producers)
    pipeline_seconds = time.perf_counter() - pipeline_start
    manifest = write_manifest(cfg, plans, out, time.perf_counter() - start, ids)
    log.info("manifest: %d samples %s, %d quarantined, %.1fs", manifest["num_samples"], manifest["counts"]["task"],
             manifest["quarantined"], manifest["seconds"])
    print(json.dumps({"output_dir": str(out), "num_samples": manifest["num_samples"],
                      "counts": manifest["counts"], "quarantined": manifest["quarantined"],
                      "shards_written": len(pending), "shards_skipped": len(plans) - len(pending),
                      "records_processed": sum(len(p.records) for p in pending),
                      "pipeline_seconds": round(pipeline_seconds, 2), "total_seconds": manifest["seconds"]}),
          flush=True)
    return manifest
