"""Feature columns (decision 2): one small Parquet file per (stage, video), under the stage's
fingerprint, holding the shard members that stage produced for that video.

    features/<stage>/<fingerprint>/stage.json             what made them (provenance)
    features/<stage>/<fingerprint>/<video_id>-<key>.parquet   rows of (member, data)

A new stage or a new model version is a new folder; nothing else is rewritten. The file
appears whole or not at all (atomic write), so its existence is the cache hit.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import exists, filesystem, join, read_bytes, write_bytes, write_json

SCHEMA = pa.schema([
    ("video_id", pa.string()), ("content_hash", pa.string()), ("key", pa.string()),
    ("member", pa.string()), ("data", pa.large_binary()),
])


class FeatureStore:
    def __init__(self, root: str) -> None:
        self.root = join(root, "features")

    def stage_dir(self, stage: str, fingerprint: str) -> str:
        return join(self.root, stage, fingerprint)

    def url(self, stage: str, fingerprint: str, video_id: str, key: str) -> str:
        return join(self.stage_dir(stage, fingerprint), f"{video_id}-{key}.parquet")

    def record_stage(self, stage: str, fingerprint: str, provenance: dict[str, Any]) -> None:
        info = join(self.stage_dir(stage, fingerprint), "stage.json")
        if not exists(info):
            write_json(info, provenance)

    def present(self, stage: str, fingerprint: str) -> set[str]:
        """File names present for a stage version: one listing instead of one stat per video."""
        fs, path = filesystem(self.stage_dir(stage, fingerprint))
        try:
            return {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            return set()

    def write(self, stage: str, fingerprint: str, video_id: str, key: str, content_hash: str,
              members: dict[str, bytes]) -> None:
        names = sorted(members)
        table = pa.table({
            "video_id": [video_id] * len(names), "content_hash": [content_hash] * len(names),
            "key": [key] * len(names), "member": names, "data": [members[n] for n in names],
        }, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_bytes(self.url(stage, fingerprint, video_id, key), buf.getvalue())

    def read(self, stage: str, fingerprint: str, video_id: str, key: str) -> dict[str, bytes]:
        table = pq.read_table(io.BytesIO(read_bytes(self.url(stage, fingerprint, video_id, key))))
        return dict(zip(table.column("member").to_pylist(), table.column("data").to_pylist(), strict=True))
