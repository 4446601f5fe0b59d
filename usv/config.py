"""Typed build configuration (decision 8): pydantic models, loadable from YAML, usable as
Prefect flow parameters, and recorded next to every output they made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from usv.errors import ConfigError

DEFAULT_STAGES = ["meta", "mel", "frames", "ocr", "diarize", "asr", "clip", "text"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Strict):
    """How sources are fetched: remote files are streamed into a local cache with limits."""

    http_timeout_s: float = 60.0
    max_bytes: int = 4 * 1024**3
    chunk_bytes: int = 1024 * 1024


class DecodeConfig(_Strict):
    """One decode per video feeds every stage (decision 5)."""

    fps: float = Field(1.0, gt=0)
    short_side: int = Field(480, ge=32, description="frames are scaled so the short side is at most this")
    max_long_side: int = Field(1280, ge=32)
    audio_rate: int = 16000
    max_seconds: float | None = Field(None, description="decode at most this much of each video")
    timeout_s: float = Field(900.0, gt=0)

    def signature(self) -> dict[str, dict[str, Any]]:
        """What shapes each decoded input: it joins the fingerprint of the stages that use it."""
        from extractors.media import DECODE_VERSION

        return {
            "frames": {"fps": self.fps, "short_side": self.short_side, "max_long_side": self.max_long_side,
                       "max_seconds": self.max_seconds, "version": DECODE_VERSION},
            "audio": {"rate": self.audio_rate, "max_seconds": self.max_seconds, "version": DECODE_VERSION},
        }


class PackConfig(_Strict):
    """How feature columns become WebDataset shards."""

    shard_max_count: int = Field(1000, ge=1)
    shard_max_bytes: int = Field(1_000_000_000, ge=1)
    split_ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    stages: list[str] | None = Field(None, description="stages to pack; None packs the build's stages")

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> PackConfig:
        total = sum(self.split_ratios.values())
        if abs(total - 1.0) > 1e-6 or any(v < 0 for v in self.split_ratios.values()):
            raise ValueError(f"split_ratios must be non-negative and sum to 1, got {self.split_ratios}")
        return self


class BuildConfig(_Strict):
    """Everything a build needs; `stage_config` holds each stage's own typed settings."""

    manifest: str = ""
    output: str = "data/out"
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    stage_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1, description="videos per Prefect task (decision 4)")
    decode_chunk: int = Field(4, ge=1, description="videos decoded together inside a batch")
    workers: int = Field(2, ge=1, description="batches run at once")
    stages_at_once: int = Field(2, ge=1, description="stage calls that run at once (e.g. ocr beside asr), across two "
                                                      "chunks, so the cores stay busy while a lone batch finishes")
    task_runner: str = Field("threads", description="threads | processes | dask | ray")
    task_runner_address: str | None = None
    stage_timeout_s: dict[str, float] = Field(
        default_factory=dict, description="seconds per video for a stage ('*': every stage); such a stage runs in "
        "its own worker process, killed at the deadline, and the video is recorded as `timeout`")
    stage_memory_gb: dict[str, float] = Field(
        default_factory=dict, description="address space a stage's worker process may add on top of its loaded "
        "models ('*': every stage; Linux); a video that exceeds it is recorded as `oom`")
    own_process: list[str] = Field(
        default_factory=lambda: ["ocr"], description="stages that run in their own worker process even without a "
        "limit: a stage with much Python around its model (OCR's pre- and post-processing) then holds its own "
        "GIL instead of slowing the stages beside it")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    pack: PackConfig = Field(default_factory=PackConfig)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> BuildConfig:
        """Load a YAML file; keyword overrides that are not None win over the file."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
