"""Pack feature columns into WebDataset shards per split, plus analysis tables.

Packing reads only the feature store (never video), so "rebuild shards" is cheap. A video
is a sample when at least one packed stage has its output; its members are the union of
those stages' members. Output is a pure function of the store, the manifest and the pack
settings: samples are ordered by a seeded hash of their id (shuffled across videos, not by
topic), tar headers carry a fixed mtime, so the same inputs give byte-identical shards.

    shards/<split>/<split>-000000.tar     samples
    shards/<split>/sizes.json             {shard file: samples}  (open_clip's format)
    shards/index.json                     splits, counts, shard names, stages and versions
    tables/videos.parquet                 one row per manifest video: labels, probe, outcome
    tables/<name>.parquet                 rows stages contribute (OCR lines, ASR segments …)
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.base import Extractor, json_bytes
from storage.atomic import atomic_local_path, filesystem, join, read_json, write_bytes, write_json
from storage.cache_keys import stage_keys
from storage.feature_store import FeatureStore
from storage.ids import stable_fraction
from storage.ledger import Ledger
from storage.manifest import Manifest, ManifestRow
from usv.config import PackConfig


def assign_split(row: ManifestRow, ratios: dict[str, float], seed: int) -> str:
    """The manifest's split, else a deterministic one from a hash of the id."""
    if row.split:
        return row.split
    x, acc = stable_fraction(row.video_id, seed), 0.0
    names = list(ratios)
    for name in names:
        acc += ratios[name]
        if x < acc:
            return name
    return names[-1]


@dataclass
class _Planned:
    row: ManifestRow
    split: str
    content_hash: str
    probe: dict[str, Any]
    found: dict[str, str]  # stage -> key


@dataclass
class PackReport:
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # manifest ids with no packable output
    tables: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.samples.values())


class Packer:
    def __init__(self, root: str, stages: Sequence[Extractor[Any]], cfg: PackConfig) -> None:
        self.root = root
        self.stages = list(stages)
        self.cfg = cfg
        self.store = FeatureStore(root)
        self.fps = {s.name: s.fingerprint() for s in self.stages}
        wanted = cfg.stages or [s.name for s in self.stages]
        self.packed = [s for s in self.stages if s.name in wanted]

    def plan(self, manifest: Manifest) -> tuple[list[_Planned], list[str]]:
        present = {s.name: self.store.present(s.name, self.fps[s.name]) for s in self.packed}
        planned, missing = [], []
        for row in manifest.rows:
            try:
                memo = read_json(join(self.root, "state", "ingest", f"{row.video_id}.json"))
            except (FileNotFoundError, ValueError):
                missing.append(row.video_id)
                continue
            keys = stage_keys(self.stages, memo["sha256"], row)
            found = {s.name: keys[s.name] for s in self.packed
                     if f"{row.video_id}-{keys[s.name]}.parquet" in present[s.name]}
            if not found or memo["source"] != row.source:
                missing.append(row.video_id)
                continue
            split = assign_split(row, self.cfg.split_ratios, self.cfg.seed)
            planned.append(_Planned(row, split, memo["sha256"], memo["probe"], found))
        return planned, missing

    def _sample(self, p: _Planned) -> dict[str, bytes | str]:
        sample: dict[str, bytes | str] = {"__key__": p.row.video_id}
        for stage, key in p.found.items():
            sample.update(self.store.read(stage, self.fps[stage], p.row.video_id, key))
        if "meta.json" in sample:
            meta = json.loads(sample["meta.json"])
            meta["split"] = p.split
            meta["provenance"] = {s: self.fps[s] for s in p.found}
            sample["meta.json"] = json_bytes(meta)
        return sample

    def _write_split(self, split: str, items: list[_Planned], tables: dict[str, list[dict[str, Any]]],
                     videos: dict[str, dict[str, Any]]) -> list[str]:
        import webdataset  # imports torch (≈1.5 s): only when shards are written, not at CLI start

        items = sorted(items, key=lambda p: stable_fraction(p.row.video_id, self.cfg.seed))
        split_dir = join(self.root, "shards", split)
        shard_names: list[str] = []
        sizes: dict[str, int] = {}
        i = 0
        while i < len(items):
            name = f"{split}-{len(shard_names):06d}.tar"
            count = size = 0
            with atomic_local_path(join(split_dir, name)) as tmp, \
                    webdataset.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
                while i < len(items) and count < self.cfg.shard_max_count and (
                        count == 0 or size < self.cfg.shard_max_bytes):
                    sample = self._sample(items[i])
                    size += sink.write(sample)
                    self._collect(items[i], sample, tables)
                    videos[items[i].row.video_id]["shard"] = f"{split}/{name}"
                    count += 1
                    i += 1
            shard_names.append(name)
            sizes[name] = count
        self._remove_stale(split_dir, set(shard_names) | {"sizes.json"})
        write_json(join(split_dir, "sizes.json"), sizes)
        return shard_names

    def _collect(self, p: _Planned, sample: dict[str, bytes | str], tables: dict[str, list[dict[str, Any]]]) -> None:
        members = {k: v for k, v in sample.items() if isinstance(v, bytes)}
        for stage in self.packed:
            if stage.name in p.found:
                for table, rows in stage.table_rows(p.row.video_id, members).items():
                    tables[table].extend(rows)

    def _remove_stale(self, split_dir: str, keep: set[str]) -> None:
        fs, path = filesystem(split_dir)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return
        for full in names:
            if full.rsplit("/", 1)[-1] not in keep:
                fs.rm(full)

    def pack(self, manifest: Manifest) -> PackReport:
        planned, missing = self.plan(manifest)
        report = PackReport(missing=missing)
        by_split: dict[str, list[_Planned]] = defaultdict(list)
        for p in planned:
            by_split[p.split].append(p)
        tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
        videos = {r.video_id: _video_row(r) for r in manifest.rows}
        for p in planned:
            videos[p.row.video_id].update(split=p.split, content_hash=p.content_hash,
                                          stages=sorted(p.found), **_probe_cols(p.probe))
        for split in sorted(set(self.cfg.split_ratios) | set(by_split)):
            report.shards[split] = self._write_split(split, by_split.get(split, []), tables, videos)
            report.samples[split] = len(by_split.get(split, []))
        self._add_errors(videos)
        self._write_table("videos", list(videos.values()))
        report.tables.append("videos")
        for name, rows in sorted(tables.items()):
            self._write_table(name, rows)
            report.tables.append(name)
        write_json(join(self.root, "shards", "index.json"), {
            "splits": {s: {"samples": report.samples[s], "shards": report.shards[s]} for s in report.shards},
            "stages": {s.name: self.fps[s.name] for s in self.packed},
            "seed": self.cfg.seed,
        })
        return report

    def _add_errors(self, videos: dict[str, dict[str, Any]]) -> None:
        latest = Ledger(self.root).latest()
        for vid, stage, status, kind, msg in zip(
                *(latest[c].to_pylist() for c in ("video_id", "stage", "status", "error_kind", "message")),
                strict=True):
            if status == "error" and vid in videos:
                videos[vid]["errors"] = sorted({*videos[vid].get("errors", []), f"{stage}:{kind}"})
                videos[vid]["first_error"] = videos[vid].get("first_error") or msg

    def _write_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"video_id": pa.array([], pa.string())}),
                       buf, compression="zstd")
        write_bytes(join(self.root, "tables", f"{name}.parquet"), buf.getvalue())


def _video_row(row: ManifestRow) -> dict[str, Any]:
    return {**row.model_dump(exclude={"row"}), "shard": None, "stages": [], "errors": [], "first_error": None,
            "content_hash": None, **_probe_cols({})}


def _probe_cols(probe: dict[str, Any]) -> dict[str, Any]:
    return {f"probe_{k}": probe.get(k) for k in ("duration", "fps", "width", "height", "has_audio", "video_codec")}
