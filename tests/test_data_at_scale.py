"""Data at cluster scale: epochs global per task (exactly once), one sample at a time from its tar, damaged and
malformed shards, shards behind a real HTTP server on loopback."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from perceptio_dist.data.sampling import GlobalSampler
from perceptio_dist.data.shard_access import index_tar, read_sample
from perceptio_dist.data.shards import read_shard


def read_in_global_order(sizes: dict[str, list[int]], weights: list[float], slots: int, epochs: int = 2,
                         window: int = 4, phases=()) -> tuple[dict[str, list], list[list]]:
    """Every slot of every step in global order until each task has been read ``epochs`` times over:
    per task its reads (epoch, shard, index), and per step the (task, shard) pairs it touched."""
    tasks = sorted(sizes)
    sampler = GlobalSampler(tasks, np.asarray(weights) / sum(weights), sizes, 7, slots, window, phases)
    totals = {t: sum(sizes[t]) for t in tasks}
    reads: dict[str, list] = {t: [] for t in tasks}
    touched, step = [], 0
    while any(len(reads[t]) < epochs * totals[t] for t in tasks):
        this_step = set()
        for slot in range(slots):
            ref = sampler.draw(step, slot)
            reads[ref.task].append((ref.epoch, ref.shard, ref.index))
            this_step.add((ref.task, ref.shard))
        touched.append(this_step)
        step += 1
    return reads, touched


def assert_exactly_once_per_epoch(reads: list, sizes: list[int], epochs: int = 2) -> None:
    total = sum(sizes)
    everything = sorted((shard, i) for shard, n in enumerate(sizes) for i in range(n))
    orders = []
    for epoch in range(epochs):
        chunk = reads[epoch * total:(epoch + 1) * total]
        assert {e for e, _, _ in chunk} == {epoch}
        assert sorted((shard, i) for _, shard, i in chunk) == everything  # each (shard, index) once
        orders.append([(shard, i) for _, shard, i in chunk])
    assert orders[0] != orders[1]  # the next epoch reshuffles


@pytest.mark.parametrize("sizes, slots", [([50, 30, 80], 2), ([1000] * 49 + [500], 16), ([5] * 3, 4)])
def test_one_task_is_read_exactly_once_per_epoch_across_all_slots(sizes, slots):
    """Drawing the slots until the reads equal the total: every (shard, index) exactly once, whatever the shard
    sizes and slot count (the per-slot epochs of the old loader left 31 % of 50/30/80 unread on 2 slots)."""
    reads, touched = read_in_global_order({"t": sizes}, [1.0], slots)
    assert_exactly_once_per_epoch(reads["t"], sizes)
    if len(sizes) > 8:  # locality: a step reads from one window of 4 shards, two at a boundary
        assert max(len(step) for step in touched) <= 8


def test_mixed_tasks_are_each_read_exactly_once_per_epoch():
    sizes = {"a": [50, 30, 80], "b": [20, 20, 7, 13]}
    reads, _ = read_in_global_order(sizes, [0.7, 0.3], slots=6)
    for task, task_sizes in sizes.items():
        assert_exactly_once_per_epoch(reads[task], task_sizes)
    shares = Counter(task for task, r in reads.items() for _ in r)
    assert shares["a"] > shares["b"]


def test_a_curriculum_draws_each_phase_by_its_weights_and_reads_every_sample_once_per_epoch():
    """Phase 'a only' until step 300 (inside the second block of 256 steps), then 'b only'. Before 256 the draws
    are those of a sampler weighted 'a only'; from block 1 on the tasks are those of a sampler weighted 'b only'
    past step 300, and epochs stay exact across the switch."""
    sizes = {"a": [50, 30, 80], "b": [20, 20, 7]}
    a_only, b_only = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    staged = GlobalSampler(["a", "b"], b_only, sizes, 3, 4, 2, [(300, a_only)])
    plain_a = GlobalSampler(["a", "b"], a_only, sizes, 3, 4, 2)
    assert {staged.draw(step, slot).task for step in range(300) for slot in range(4)} == {"a"}
    assert {staged.draw(step, slot).task for step in range(300, 700) for slot in range(4)} == {"b"}
    assert all(staged.draw(step, slot) == plain_a.draw(step, slot) for step in (0, 17, 255) for slot in range(4))
    # a mixed final phase: its draws from block 2 on are a plain sampler's task choices
    mixed = np.array([0.4, 0.6])
    staged = GlobalSampler(["a", "b"], mixed, sizes, 3, 4, 2, [(100, a_only), (300, b_only)])
    plain = GlobalSampler(["a", "b"], mixed, sizes, 3, 4, 2)
    tasks = [(staged.draw(s, k).task, plain.draw(s, k).task) for s in range(512, 600) for k in range(4)]
    assert all(x == y for x, y in tasks) and {x for x, _ in tasks} == {"a", "b"}
    reads, _ = read_in_global_order(sizes, [0.4, 0.6], slots=4, phases=[(100, a_only), (300, b_only)])
    for task, task_sizes in sizes.items():
        assert_exactly_once_per_epoch(reads[task], task_sizes)
    with pytest.raises(ValueError, match="increasing"):
        GlobalSampler(["a", "b"], mixed, sizes, 3, 4, 2, [(300, a_only), (100, b_only)])


def test_the_samples_of_a_step_do_not_depend_on_which_rank_computes_them():
    """Pure arithmetic: two samplers, one asked out of order, agree (what exact and elastic resume rest on)."""
    sizes = {"a": [50, 30, 80], "b": [20, 20, 7]}
    first = GlobalSampler(["a", "b"], np.array([0.5, 0.5]), sizes, 3, 8, 2)
    second = GlobalSampler(["a", "b"], np.array([0.5, 0.5]), sizes, 3, 8, 2)
    wanted = [(step, slot) for step in (700, 3, 0, 256, 255) for slot in (7, 0, 3)]
    late = {k: second.draw(*k) for k in wanted}
    assert all(first.draw(step, slot) == late[(step, slot)] for step, slot in sorted(wanted))


# ------------------------------------------------------------------------------------ one sample at a time


def test_the_tar_index_reads_what_webdataset_reads(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    entry = manifest["shards"][0]
    path = tiny_shards / entry["path"]
    reference = list(read_shard(path))
    with open(path, "rb") as f:
        spans = index_tar(f)
        assert [s.key for s in spans] == [r.key for r in reference] == entry["keys"]
        for k in (len(spans) - 1, 0, len(spans) // 2):  # any order, one seek per member
            assert read_sample(f, spans[k]) == reference[k]
    assert entry["bytes"] == path.stat().st_size


# ------------------------------------------------------------------------------- damaged and malformed data


def copy_shards(tiny_shards: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    return folder


def task_loader(cfg, tokenizer, folder, task: str, micro: int = 4, **data):
    """A one-rank loader over one task of ``folder`` (other data fields as given)."""
    from dataclasses import replace

    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.model.spatial_tokens import add_spatial_tokens

    cfg = replace(cfg, data=replace(cfg.data, shards=str(folder), task_weights={task: 1.0}, **data),
                  train=replace(cfg.train, micro_batch_size=micro, grad_accum_steps=1))
    return build_loader(cfg, tokenizer, add_spatial_tokens(tokenizer, cfg.model.tokens), 0, 1)


def one_epoch_keys(loader, task_total: int, micro: int = 4) -> list[str]:
    it = iter(loader)
    return [k for _ in range(-(-task_total // micro)) for k in next(it).keys]


def shard_of(folder: Path, task: str, which: int = 0) -> dict:
    return [s for s in json.loads((folder / "manifest.json").read_text())["shards"] if s["task"] == task][which]


def task_total(folder: Path, task: str) -> int:
    return sum(s["num_samples"] for s in json.loads((folder / "manifest.json").read_text())["shards"]
               if s["task"] == task)


def test_a_truncated_shard_stops_every_rank_before_the_first_step(tiny_cfg, tiny_tokenizer, tmp_path, tiny_shards):
    from perceptio_dist.data.shard_access import DamagedShardError

    folder = copy_shards(tiny_shards, tmp_path)
    entry = shard_of(folder, "depth")
    path = folder / entry["path"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a killed copy
    with pytest.raises(DamagedShardError) as caught:
        task_loader(tiny_cfg, tiny_tokenizer, folder, "depth")
    message = str(caught.value)
    assert entry["path"] in message and "data.damaged_shards=skip" in message and "\n" not in message


def test_a_skipped_damaged_shard_drops_only_its_samples(tiny_cfg, tiny_tokenizer, tmp_path, tiny_shards):
    folder = copy_shards(tiny_shards, tmp_path)
    entry = shard_of(folder, "depth")
    path = folder / entry["path"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    total = task_total(folder, "depth")
    clean = one_epoch_keys(task_loader(tiny_cfg, tiny_tokenizer, tiny_shards, "depth"), total)
    loader = task_loader(tiny_cfg, tiny_tokenizer, folder, "depth", damaged_shards="skip")
    kept = one_epoch_keys(loader, total)
    assert kept == [k for k in clean if k not in set(entry["keys"])]
    assert loader.skipped == entry["num_samples"]


def test_a_rewritten_shard_is_found_by_its_checksum_when_opened(tiny_cfg, tiny_tokenizer, tmp_path, tiny_shards):
    """Same size, other bytes (a shard re-rendered after preprocessing): sha256 on open stops the run, in a
    DataLoader worker too, with the message and not a worker traceback."""
    from perceptio_dist.data.shard_access import DamagedShardError

    folder = copy_shards(tiny_shards, tmp_path)
    entry = shard_of(folder, "depth")
    path = folder / entry["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    total = task_total(folder, "depth")
    loader = task_loader(tiny_cfg, tiny_tokenizer, folder, "depth", verify="sha256", num_workers=1)
    with pytest.raises(DamagedShardError) as caught:
        one_epoch_keys(loader, total)
    assert entry["path"] in str(caught.value) and "sha256" in str(caught.value)
    assert "Traceback" not in str(caught.value)


def rewrite_member(path: Path, key: str, ext: str, data: bytes | None) -> None:
    """Rewrite a tar with one member replaced (None: removed), as a writer bug would leave it."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for m, blob in members:
            if m.name == f"{key}.{ext}":
                if data is None:
                    continue
                blob = data
                m.size = len(blob)
            import io

            tar.addfile(m, io.BytesIO(blob))


@pytest.mark.parametrize("ext, data", [("json", b"{not json"), ("png", None), ("png", b"\x89PNG\r\n\x1a\ncut")])
def test_a_malformed_member_drops_only_its_sample(tiny_cfg, tiny_tokenizer, tmp_path, tiny_shards, ext, data):
    """Bad JSON, a missing image, a truncated image inside a tar that matches its manifest: that sample is
    dropped and counted, the rest of its shard is read (webdataset's reader failed the whole shard on bad JSON)."""
    from perceptio_dist.data.shards import file_sha256

    folder = copy_shards(tiny_shards, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["task"] == "depth")
    broken = entry["keys"][3]
    path = folder / entry["path"]
    rewrite_member(path, broken, ext, data)
    entry["sha256"], entry["bytes"] = file_sha256(path), path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    total = task_total(folder, "depth")
    clean = one_epoch_keys(task_loader(tiny_cfg, tiny_tokenizer, tiny_shards, "depth"), total)
    loader = task_loader(tiny_cfg, tiny_tokenizer, folder, "depth", verify="sha256")
    assert one_epoch_keys(loader, total) == [k for k in clean if k != broken]
    assert loader.skipped == 1


# ------------------------------------------------------------------------------------ shards from a URL


@pytest.fixture
def served(tmp_path, tiny_shards):
    """A copy of the shard folder behind a real HTTP server on loopback (Python's http.server)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = copy_shards(tiny_shards, tmp_path)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_over_http_give_the_batches_of_the_local_folder(tiny_cfg, tiny_tokenizer, tmp_path, served,
                                                               tiny_shards):
    import torch

    folder, url = served
    cache = tmp_path / "cache"
    local = iter(task_loader(tiny_cfg, tiny_tokenizer, tiny_shards, "relative_depth"))
    remote = iter(task_loader(tiny_cfg, tiny_tokenizer, url, "relative_depth", cache_dir=str(cache)))
    for _ in range(6):
        a, b = next(local), next(remote)
        assert a.keys == b.keys
        assert all(torch.equal(x, y) if x is not None else y is None
                   for x, y in zip(a.as_dict().values(), b.as_dict().values()))
    cached = sorted(p.relative_to(p.parents[1]) for p in cache.glob("*/*/*.tar"))
    assert cached and all((folder / p).read_bytes() == next(cache.glob(f"*/{p}")).read_bytes() for p in cached)


@pytest.mark.parametrize("change", ["rewritten", "deleted"])
def test_a_shard_that_changes_or_disappears_on_the_server_stops_the_run(tiny_cfg, tiny_tokenizer, tmp_path,
                                                                        served, change):
    from perceptio_dist.data.shard_access import DamagedShardError

    folder, url = served
    loader = task_loader(tiny_cfg, tiny_tokenizer, url, "depth", cache_dir=str(tmp_path / "cache"))
    entry = shard_of(folder, "depth", 1)
    path = folder / entry["path"]
    if change == "deleted":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(DamagedShardError) as caught:
        one_epoch_keys(loader, task_total(folder, "depth"))
    assert entry["path"] in str(caught.value)
    assert ("changed on the server" if change == "rewritten" else "could not be fetched") in str(caught.value)


def test_an_unreachable_url_is_a_config_error(tiny_cfg, tiny_tokenizer, tmp_path):
    from perceptio_dist.config import ConfigError

    with pytest.raises(ConfigError, match="cannot read http://127.0.0.1:9/nothing/manifest.json"):
        task_loader(tiny_cfg, tiny_tokenizer, "http://127.0.0.1:9/nothing", "depth", cache_dir=str(tmp_path))


def test_a_worker_keeps_at_most_max_open_shards_and_no_samples(tiny_shards):
    """Bounded memory: reading every shard in turn keeps at most max_open (handle, index) pairs; the samples
    equal webdataset's."""
    from perceptio_dist.data.shard_access import OpenShards, ShardStore

    store = ShardStore(tiny_shards)
    shards = OpenShards(store, max_open=3)
    entries = store.manifest["shards"]
    for entry in entries:
        reference = list(read_shard(tiny_shards / entry["path"]))
        assert [shards.sample(entry, i) for i in range(entry["num_samples"])] == reference
        assert len(shards._open) <= 3
    shards.close()
    assert not shards._open
