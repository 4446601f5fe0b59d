"""The extractor contract: one stage = one class in its own module, registered by name.

A stage declares what it needs from the single decode (`needs`: probe, frames, audio), which
stages' outputs it reads (`requires`), its resources and batch size, and a typed `Config`.
`setup()` loads models once per worker process; `process()` takes a *batch* of decoded videos
and returns, per video, the shard members it produced (`{"mel.npy": bytes, ...}`) or a typed
`UsvError`. Its cache key (decision 1) is built from `fingerprint()` — name, version, config
and the hash of its weights — plus the video's content hash and its upstream keys.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from extractors.media import Probe
from storage.manifest import ManifestRow
from usv.errors import ConfigError, UsvError

Need = Literal["probe", "frames", "audio"]
Members = dict[str, bytes]


class StageConfig(BaseModel):
    """Base of every stage's settings: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Video:
    """One decoded video as every stage sees it; arrays are absent when no stage needs them."""

    row: ManifestRow
    content_hash: str
    probe: Probe
    frames: np.ndarray | None = None  # (N, H, W, 3) uint8 at decode.fps
    frame_times: np.ndarray | None = None  # seconds
    audio: np.ndarray | None = None  # float32 mono at decode.audio_rate
    audio_rate: int = 16000
    upstream: dict[str, Members] = field(default_factory=dict)  # outputs of `requires` stages

    @property
    def video_id(self) -> str:
        return self.row.video_id


C = TypeVar("C", bound=StageConfig)


class Extractor(ABC, Generic[C]):
    name: ClassVar[str]
    version: ClassVar[str] = "1"  # bump when the output for the same input changes
    Config: ClassVar[type[StageConfig]] = StageConfig
    needs: ClassVar[frozenset[Need]] = frozenset({"probe"})
    requires: ClassVar[tuple[str, ...]] = ()
    # Those of `requires` the content may lack (e.g. asr of a video without audio): when one
    # fails as absent (ABSENT_INPUT), this stage still runs and `video.upstream` lacks it.
    optional_requires: ClassVar[tuple[str, ...]] = ()
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 8

    def __init__(self, config: C, decode: dict[str, Any] | None = None) -> None:
        self.config = config
        self.decode = decode or {}  # the decode settings of the inputs in `needs`: they shape the output
        self._ready = False

    def setup(self) -> None:
        """Load models; called once per worker before the first batch."""

    def teardown(self) -> None:
        """Free models."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def weights_id(self) -> str:
        """Hash of the model weights this stage uses; '' for stages without a model."""
        return ""

    def provenance(self) -> dict[str, Any]:
        """What made this stage's outputs; extend to flag e.g. random weights."""
        prov = {"stage": self.name, "version": self.version, "config": self.config.model_dump(mode="json"),
                "weights": self.weights_id()}
        if self.decode:
            prov["decode"] = self.decode
        return prov

    def fingerprint(self) -> str:
        blob = json.dumps(self.provenance(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def row_inputs(self, row: ManifestRow) -> dict[str, Any]:
        """Manifest fields the output depends on (they join the cache key)."""
        return {}

    def table_rows(self, video_id: str, members: Members) -> dict[str, list[dict[str, Any]]]:
        """Rows this stage adds to the analysis tables at pack time (OCR lines, ASR segments …)."""
        return {}

    @abstractmethod
    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        """One result per input video, in order."""


_REGISTRY: dict[str, type[Extractor[Any]]] = {}
_E = TypeVar("_E", bound=type[Extractor[Any]])


def register(cls: _E) -> _E:
    """Class decorator: make a stage available by its name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two stages named {cls.name!r}")
    if not set(cls.optional_requires) <= set(cls.requires):
        raise ValueError(f"stage {cls.name!r}: optional_requires must be a subset of requires")
    _REGISTRY[cls.name] = cls
    return cls


BUILTIN_MODULES = ("meta", "mel", "frames", "ocr", "asr", "diarize", "clip", "text")


def _load_builtins() -> None:
    import importlib

    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(f"extractors.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"extractors.{mod}":
                raise


def registry() -> dict[str, type[Extractor[Any]]]:
    _load_builtins()
    return dict(_REGISTRY)


def make_stage(name: str, settings: dict[str, Any] | None = None,
               decode: dict[str, Any] | None = None) -> Extractor[Any]:
    stages = registry()
    if name not in stages:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(sorted(stages))}")
    cls = stages[name]
    try:
        config = cls.Config.model_validate(settings or {})
    except ValueError as exc:
        raise ConfigError(f"bad settings for stage {name!r}: {exc}") from exc
    return cls(config, {k: v for k, v in (decode or {}).items() if k in cls.needs})


def order_stages(names: Sequence[str]) -> list[str]:
    """Stages with their required stages first (requirements are added if missing)."""
    stages = registry()
    out: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in out:
            return
        if name in path:
            raise ConfigError(f"stage requirements form a cycle: {' -> '.join((*path, name))}")
        if name not in stages:
            raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(sorted(stages))}")
        for dep in stages[name].requires:
            visit(dep, (*path, name))
        out.append(name)

    for n in names:
        visit(n, ())
    return out


_DIGESTS: dict[str, str] = {}


def _digest_memo() -> Path:
    from extractors.weights import models_cache

    return models_cache() / "weight-digests.json"


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over weight files (names and bytes), for `weights_id`. Hashing ~1 GB of weights took
    ≈2.5 s of every build's start, so digests are memoised by (path, size, mtime) in the process and
    in `<models cache>/weight-digests.json` (a changed file has a new size or mtime, and is re-hashed)."""
    files = sorted(Path(p) for p in paths)
    key = json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    if key in _DIGESTS:
        return _DIGESTS[key]
    memo = _digest_memo()
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.name.encode())
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        known[key] = digest.hexdigest()[:16]
        try:
            from storage.atomic import write_json

            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json(str(memo), known)
        except OSError:  # a read-only cache only costs the re-hash next time
            pass
    _DIGESTS[key] = known[key]
    return known[key]


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes: the same array always gives the same bytes."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, UTF-8), so identical content gives identical shards."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
