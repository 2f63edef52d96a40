"""Shards from a folder or a URL, opened one sample at a time, checked against the manifest.

* ``ShardStore``: where the manifest and each shard's bytes come from. A local folder is read in place. A URL
  (``https://``, ``http://``, ``s3://``, ``gs://``, ``file://``, anything fsspec opens) is fetched a whole shard
  at a time into ``cache_dir`` (a temporary name, checked, then renamed), so a cached shard always matches the
  manifest's size and sha256; a shard that changed or disappeared on the server stops the run with its name.
* ``TarIndex``: the member offsets of a tar, from its headers alone (the 512-byte header blocks, as
  webdataset's indexed ``wids`` does), so one sample is read with one seek and a few reads.
* ``OpenShards``: the few shards a worker has open (file handle + index, least recently used closed first).
  Memory per worker is bounded by ``max_open`` indexes (a few hundred bytes per sample) and one sample's bytes,
  never whole shards.
* Damage: a shard whose size (always) or sha256 (``verify: sha256``) differs from the manifest is found when it
  is opened, and by ``policy`` either stops the run (``DamagedShardError``, one paragraph) or is skipped, its
  samples dropped and counted. A malformed member in a good tar (bad JSON, missing image) fails only its sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import ConfigError
from .config import SHARD_URL_SCHEMES
from .shards import MANIFEST, ShardSample, file_sha256, read_manifest

log = logging.getLogger(__name__)


def is_url(location: str | Path) -> bool:
    return str(location).startswith(SHARD_URL_SCHEMES)


class DamagedShardError(ConfigError):
    """A shard that does not match its manifest (data.damaged_shards: stop). Printed by whichever rank finds it."""

    every_rank = True


def damaged_message(shard: str, location: str, problem: str, samples: int) -> str:
    return (f"Data error: shard {shard} of {location} {problem}. It was probably truncated by an interrupted "
            f"copy, rewritten after preprocessing, or changed on the server. Copy it again from where the "
            f"preprocessing wrote it (or re-run the preprocessing, which redoes shards whose completion marker does "
            f"not match), or set data.damaged_shards=skip to train without its {samples} samples (they are "
            f"counted in data/skipped_samples).")


@dataclass(frozen=True)
class MemberSpan:
    offset: int
    size: int


@dataclass(frozen=True)
class SampleSpans:
    key: str
    members: dict[str, MemberSpan]  # extension (png, json, mask.png, ...) -> where its bytes are


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the name up to the first dot of its last path part."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_tar(f: BinaryIO) -> list[SampleSpans]:
    """Samples of a tar in stored order with their members' data offsets, reading only the headers."""
    samples: list[SampleSpans] = []
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if not samples or samples[-1].key != key:
                samples.append(SampleSpans(key, {}))
            samples[-1].members[ext] = MemberSpan(member.offset_data, member.size)
    return samples


def read_sample(f: BinaryIO, spans: SampleSpans) -> ShardSample:
    """One sample's bytes by seeking to each member (a malformed member raises here, for this sample only)."""
    data: dict = {"__key__": spans.key}
    for ext, span in spans.members.items():
        f.seek(span.offset)
        blob = f.read(span.size)
        if len(blob) != span.size:
            raise ValueError(f"member {spans.key}.{ext} is cut short ({len(blob)} of {span.size} bytes)")
        data[ext] = blob
    if "png" not in data and "jpg" not in data:
        raise ValueError(f"sample {spans.key} has no image member (png or jpg)")
    return ShardSample.from_webdataset(data)


class ShardStore:
    """The manifest and local, verified files for the shards of ``location`` (a folder or a URL)."""

    def __init__(self, location: str | Path, cache_dir: str | Path | None = None, verify: str = "size"):
        self.location = str(location).rstrip("/")
        self.remote = is_url(self.location)
        self.verify = verify
        if self.remote:
            # data.cache_dir arrives resolved by the config; the default is built here, not expanded
            base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "perceptio_dist" / "shards"
            self.cache = base / hashlib.sha256(self.location.encode()).hexdigest()[:16]
        else:
            self.cache = None
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not self.remote:
            return read_manifest(Path(self.location))
        import fsspec

        url = f"{self.location}/{MANIFEST}"
        try:
            fs, path = fsspec.core.url_to_fs(url)
            manifest = json.loads(fs.cat_file(path))
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise ConfigError(f"Config error at 'data.shards': cannot read {url} ({type(exc).__name__}: {exc}). "
                              "Check the URL and that the server serves the preprocessing job's output "
                              "folder.") from None
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.cache / MANIFEST).write_text(json.dumps(manifest))  # what the cached shards were checked against
        return manifest

    def check_sizes(self, entries: list[dict]) -> list[tuple[dict, str]]:
        """(shard entry, problem) for every local shard whose size on disk differs from the manifest's: a stat
        per shard, done by every rank at start so a truncated copy stops the run before the first step."""
        if self.remote:
            return []
        problems = []
        for entry in entries:
            path = Path(self.location) / entry["path"]
            problem = self._size_problem(path, entry)
            if problem:
                problems.append((entry, problem))
        return problems

    @staticmethod
    def _size_problem(path: Path, entry: dict) -> str | None:
        if not path.exists():
            return "is missing"
        expected = entry.get("bytes")
        actual = path.stat().st_size
        if expected is not None and actual != expected:
            return f"has {actual} bytes, the manifest says {expected}"
        return None

    def local_path(self, entry: dict) -> Path:
        """A local file with the shard's bytes, checked (size always; sha256 when verify is sha256 or remote).
        Raises ``DamagedShardError``-worthy problems as ``ShardProblem``."""
        if not self.remote:
            path = Path(self.location) / entry["path"]
            problem = self._size_problem(path, entry)
            if problem is None and self.verify == "sha256" and file_sha256(path) != entry["sha256"]:
                problem = "does not match the manifest's sha256"
            if problem:
                raise ShardProblem(problem)
            return path
        path = self.cache / entry["path"]
        if path.exists() and self._size_problem(path, entry) is None:
            return path  # verified by sha256 when it was fetched
        self._fetch(entry, path)
        return path

    def _fetch(self, entry: dict, path: Path) -> None:
        """The whole shard into the cache (each implementation's own download: a streamed GET over HTTP), kept
        only when its sha256 matches the manifest."""
        import fsspec

        url = f"{self.location}/{entry['path']}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        try:
            fs, remote = fsspec.core.url_to_fs(url)
            fs.get_file(remote, str(tmp))
        except (FileNotFoundError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise ShardProblem(f"could not be fetched from {url} ({type(exc).__name__}: {exc})") from None
        if file_sha256(tmp) != entry["sha256"]:
            tmp.unlink(missing_ok=True)
            raise ShardProblem(f"fetched from {url} does not match the manifest's sha256 (it changed on the server "
                               "after preprocessing)")
        os.replace(tmp, path)
        log.info("fetched %s into %s", url, path)


class ShardProblem(Exception):
    """Why a shard cannot be used (the loader turns it into the policy's stop or skip)."""


class OpenShards:
    """The shards one worker has open: file handle and tar index each, least recently used closed first."""

    def __init__(self, store: ShardStore, max_open: int):
        self.store, self.max_open = store, max(1, max_open)
        self._open: OrderedDict[str, tuple[BinaryIO, list[SampleSpans]]] = OrderedDict()
        self.bad: dict[str, str] = {}  # shard path -> problem, remembered so a skipped shard is checked once

    def sample(self, entry: dict, index: int) -> ShardSample:
        name = entry["path"]
        if name in self.bad:
            raise ShardProblem(self.bad[name])
        if name not in self._open:
            try:
                path = self.store.local_path(entry)
                f = open(path, "rb")
                try:
                    spans = index_tar(f)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    f.close()
                    raise ShardProblem(f"is not a readable tar ({type(exc).__name__}: {exc})") from None
                if len(spans) != entry["num_samples"]:
                    f.close()
                    raise ShardProblem(f"holds {len(spans)} samples, the manifest says {entry['num_samples']}")
            except ShardProblem as exc:
                self.bad[name] = str(exc)
                raise
            self._open[name] = (f, spans)
            if len(self._open) > self.max_open:
                _, (old, _) = self._open.popitem(last=False)
                old.close()
        self._open.move_to_end(name)
        f, spans = self._open[name]
        return read_sample(f, spans[index])

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()
