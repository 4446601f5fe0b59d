"""`meta`: the video's labels and ffprobe metadata, the `meta.json` of every shard sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from extractors.base import Extractor, Members, StageConfig, Video, json_bytes, register
from storage.manifest import ManifestRow
from usv.errors import UsvError

LABEL_FIELDS = ("raw_id", "title", "topic", "macro_topic", "split", "creator", "language")


@register
class MetaStage(Extractor[StageConfig]):
    name = "meta"
    version = "1"
    needs = frozenset({"probe"})
    batch_size = 256

    def row_inputs(self, row: ManifestRow) -> dict[str, Any]:
        return {f: getattr(row, f) for f in LABEL_FIELDS}

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        return [
            {"meta.json": json_bytes({
                "video_id": v.video_id,
                **self.row_inputs(v.row),
                "content_hash": v.content_hash,
                **v.probe.to_dict(),
            })}
            for v in videos
        ]
