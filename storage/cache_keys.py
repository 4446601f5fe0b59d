"""Cache keys (decision 1): a stage's output for a video is named by everything that made it.

key = H(stage fingerprint [name, version, config, weights], content hash of the video,
        keys of the upstream stages it read, manifest fields it used)
Change a stage's settings and its fingerprint changes, so only it (and stages that read it)
re-run; add a video and only its keys are new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


def video_key(stage_fingerprint: str, content_hash: str, upstream: Mapping[str, str] | None = None,
              row_inputs: Mapping[str, Any] | None = None) -> str:
    blob = json.dumps(
        {"stage": stage_fingerprint, "content": content_hash, "upstream": dict(upstream or {}),
         "row": dict(row_inputs or {})},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class KeyedStage(Protocol):
    name: str
    requires: tuple[str, ...]

    def fingerprint(self) -> str: ...

    def row_inputs(self, row: Any) -> dict[str, Any]: ...


def stage_keys(stages: Sequence[KeyedStage], content_hash: str, row: Any) -> dict[str, str]:
    """Keys of every stage for one video; `stages` must list requirements first."""
    keys: dict[str, str] = {}
    for stage in stages:
        upstream = {dep: keys[dep] for dep in stage.requires}
        keys[stage.name] = video_key(stage.fingerprint(), content_hash, upstream, stage.row_inputs(row))
    return keys
