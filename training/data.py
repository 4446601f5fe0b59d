"""Reading packed shards for training: never a video, only the cached features.

A split is the URLs listed in `shards/<split>/sizes.json` (sample counts come from there, so
an epoch's length is known without reading). Streams are `webdataset` pipelines: in one
process an epoch is one pass (shards shuffled, then a seeded shuffle buffer); with several
processes (DDP) every rank samples shards with replacement (`ResampledShards`) and takes the
same number of batches, so no rank waits on another at the end of an epoch — the pattern
webdataset recommends when shards are few. DataLoader workers split shards by worker.
Members are decoded lazily: a branch parses only the members it reads.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

from storage.atomic import join, read_json, webdataset_urls
from training.config import DataConfig
from usv.errors import ConfigError

webdataset_urls()  # shards on s3:// and other fsspec URLs
Transform = Callable[[dict[str, Any], np.random.Generator | None], dict[str, Any] | None]


@dataclass(frozen=True)
class Split:
    name: str
    urls: list[str]
    samples: int


@dataclass(frozen=True)
class ShardSet:
    """A shard root (the folder holding index.json) and what was packed into it."""

    root: str
    index: dict[str, Any]

    @classmethod
    def open(cls, url: str) -> ShardSet:
        for root in (url.rstrip("/"), join(url, "shards")):
            try:
                return cls(root, read_json(join(root, "index.json")))
            except (FileNotFoundError, ValueError):
                continue
        raise ConfigError(f"no shards/index.json under {url}: run `usv build … --output {url}` first")

    @property
    def stages(self) -> set[str]:
        return set(self.index.get("stages", {}))

    def split(self, name: str) -> Split:
        folder = join(self.root, name)
        try:
            sizes: dict[str, int] = read_json(join(folder, "sizes.json"))
        except (FileNotFoundError, ValueError) as exc:
            known = ", ".join(sorted(self.index.get("splits", {}))) or "none"
            raise ConfigError(f"split {name!r} has no sizes.json under {self.root} (splits: {known})") from exc
        urls = [join(folder, shard) for shard, n in sorted(sizes.items()) if n > 0]
        for url in urls[:1]:
            _register_scheme(url)
        return Split(name, urls, sum(sizes.values()))


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    import fsspec

    return fsspec.open(url, mode).open()


def _register_scheme(url: str) -> None:
    """webdataset opens local, http(s), pipe: … itself; any other fsspec URL (s3://, gcs://, memory://)
    goes through fsspec, added to webdataset's own dispatch table of URL schemes."""
    from webdataset.gopen import gopen_schemes

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme not in gopen_schemes:
        gopen_schemes[scheme] = _fsspec_open


def load_member(sample: dict[str, Any], member: str) -> Any:
    """Parse one member (`x.npy` → array, `x.json` → object); None when the sample lacks it."""
    raw = sample.get(member)
    if raw is None:
        return None
    if member.endswith(".npy"):
        return np.load(io.BytesIO(raw), allow_pickle=False)
    if member.endswith(".json"):
        return json.loads(raw)
    return raw


def class_counts(shards: ShardSet, split: str) -> dict[str, int]:
    """Videos per topic in a split, from tables/videos.parquet when present, else from meta.json."""
    try:
        import pyarrow.parquet as pq

        from storage.atomic import filesystem

        fs, path = filesystem(join(shards.root.rsplit("/", 1)[0], "tables", "videos.parquet"))
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=["topic", "split", "stages"]).to_pylist()
        topics = [r["topic"] for r in table if r["split"] == split and r["stages"] and r["topic"]]
    except (FileNotFoundError, OSError, KeyError, ValueError):
        topics = [(load_member(s, "meta.json") or {}).get("topic") for s in iterate_raw(shards.split(split).urls)]
    counts = Counter(t for t in topics if t)
    if not counts:
        raise ConfigError(f"split {split!r} under {shards.root} has no labelled samples")
    return dict(sorted(counts.items()))


def class_list(shards: ShardSet, split: str) -> list[str]:
    """Sorted topic names of a split: the class index of every model trained on it."""
    return list(class_counts(shards, split))


def iterate_raw(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Samples of `urls` in stored order, undecoded (one process, for evaluation and scans)."""
    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


class _Apply:
    """Applies a transform with its own seeded generator per (seed, epoch, rank, worker)."""

    def __init__(self, transform: Transform, seed: int | None, epoch: int, rank: int) -> None:
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank
        self.rng: np.random.Generator | None = None
        self.dropped = 0

    def __call__(self, data: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.seed is not None and self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, self.epoch, self.rank, info.id if info else 0])
        for sample in data:
            out = self.transform(sample, self.rng)
            if out is None:
                self.dropped += 1
                continue
            out["__key__"] = sample["__key__"]
            yield out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays into tensors; strings stay lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = vals if isinstance(vals[0], str) else torch.from_numpy(np.stack([np.asarray(v) for v in vals]))
    return out


def train_stream(split: Split, transform: Transform, cfg: DataConfig, *, seed: int, epoch: int,
                 rank: int = 0, world: int = 1) -> tuple[Iterator[dict[str, Any]], int]:
    """Batches of one training epoch and how many there will be (the same on every rank)."""
    resampled = cfg.resampled if cfg.resampled is not None else world > 1
    steps = max(1, math.ceil(split.samples / (cfg.batch_size * world)))
    if resampled:
        source: list[Any] = [wds.ResampledShards(split.urls, seed=seed + 7919 * epoch, deterministic=True)]
    else:
        source = [wds.SimpleShardList(split.urls, seed=seed + epoch), wds.split_by_node, wds.split_by_worker]
    pipeline = wds.DataPipeline(
        *source, wds.tarfile_to_samples(),
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 64), seed=seed * 1000 + epoch * 10 + rank),
        _Apply(transform, seed, epoch, rank),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=True),
    )
    if resampled:
        pipeline = pipeline.with_epoch(nbatches=steps)
    if cfg.num_workers:
        # forkserver, not fork: a fork of a process whose thread pools (OpenMP, ONNX Runtime, Prefect's
        # services) are already running can leave a worker broken; forkserver children start clean.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False,
                               multiprocessing_context="forkserver")
        return iter(loader), steps
    return iter(pipeline), steps


def eval_batches(split: Split, transform: Transform, batch_size: int) -> Iterator[dict[str, Any]]:
    """Deterministic batches of a split in stored order (no augmentation, no shuffling)."""
    apply = _Apply(transform, None, 0, 0)
    yield from wds.DataPipeline(wds.SimpleShardList(split.urls), wds.tarfile_to_samples(), apply,
                                wds.batched(batch_size, collation_fn=collate, partial=True))


def tsn_indices(n: int, segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN sampling: one random frame per equal segment (training) or segment centres (test)."""
    edges = np.linspace(0, n, segments + 1)
    offset = 0.5 if rng is None else rng.random(segments)
    idx = edges[:-1] + offset * (edges[1:] - edges[:-1])
    return np.clip(np.floor(idx).astype(int), 0, n - 1)


def mel_crops(mel: np.ndarray, frames: int, clips: int, rng: np.random.Generator | None) -> np.ndarray:
    """(clips, 1, n_mels, frames) crops: random positions in training, uniform at test; short tracks padded."""
    n_mels, t = mel.shape
    if t < frames:
        floor = float(mel.min()) if mel.size else 0.0
        mel = np.concatenate([mel, np.full((n_mels, frames - t), floor, mel.dtype)], axis=1)
        t = frames
    if rng is None:
        starts = np.linspace(0, t - frames, clips).round().astype(int)
    else:
        starts = rng.integers(0, t - frames + 1, size=clips)
    return np.stack([mel[:, s:s + frames] for s in starts])[:, None].astype(np.float32)
