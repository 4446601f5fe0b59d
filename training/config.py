"""Typed training configuration (decision 8): pydantic models loadable from YAML, usable as
Prefect flow parameters, and written resolved into every run folder.

Defaults follow the paper (TSN 8 segments / 24 test frames, 2 s log-Mel crops / 10 test clips,
fusion weights 1 / 0.5 / 0.5, InfoNCE temperature 0.05, 20 × 1,000 retrieval subsets); network
widths and epochs are small so a CPU run finishes, and are all settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from usv.errors import ConfigError

Branch = Literal["visual", "audio", "text"]
TextField = Literal["subtitle", "transcript"]
BRANCHES: tuple[Branch, ...] = ("visual", "audio", "text")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """Where the shards are and how they are streamed."""

    shards: str = Field("data/out", description="build output root, its shards/ folder, or a split folder's parent")
    train_split: str = "train"
    eval_split: str = "test"
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (shards are split between them)")
    shuffle_buffer: int = Field(256, ge=1)
    resampled: bool | None = Field(None, description="sample shards with replacement; None = only when distributed")


class AugmentConfig(_Strict):
    """Feature-level augmentation: training never decodes video, so it perturbs cached features."""

    feature_noise: float = Field(0.01, ge=0, description="std of Gaussian noise added to embeddings")
    mel_noise: float = Field(0.05, ge=0, description="std of Gaussian noise added to log-Mel crops")
    mel_gain_db: float = Field(3.0, ge=0, description="random gain in ± dB (log-Mel offset)")


class OptimConfig(_Strict):
    epochs: int = Field(20, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="keeps branch scores calibrated for late fusion")


class VisualConfig(_Strict):
    """Branch I: TSN consensus over cached per-second CLIP embeddings."""

    segments: int = Field(8, ge=1, description="TSN segments; one random frame each in training")
    test_frames: int = Field(24, ge=1, description="uniform frames averaged at test time")
    hidden: int = Field(256, ge=0, description="0 = linear head")
    dropout: float = Field(0.2, ge=0, lt=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)


class AudioConfig(_Strict):
    """Branch II: a ResNet-18-style 2D CNN on 1×80×128 log-Mel crops (2 s at 16 ms hop)."""

    crop_frames: int = Field(128, ge=8)
    test_clips: int = Field(10, ge=1)
    width: int = Field(16, ge=4, description="channels of the first stage (ResNet-18 uses 64)")
    blocks: list[int] = Field(default_factory=lambda: [2, 2, 2, 2], description="BasicBlocks per stage")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=15, lr=2e-3))


class TextConfig(_Strict):
    """Branch III: a classifier on frozen text embeddings (never the title: it names the topic)."""

    fields: list[TextField] = Field(default_factory=lambda: ["subtitle"])
    hidden: int = Field(256, ge=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)


class RunConfig(_Strict):
    """Shared by every run: where it goes, which device, which seed."""

    output: str = Field("runs", description="parent folder of run folders")
    name: str | None = Field(None, description="run folder name; default <task>-<timestamp>")
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(True, description="mixed precision (torch.autocast) on CUDA")


class TopicConfig(_Strict):
    """MMF-Net: three branches trained separately, late fusion of their softmax scores."""

    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    branches: list[Branch] = Field(default_factory=lambda: list(BRANCHES))
    visual: VisualConfig = Field(default_factory=VisualConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    fusion_weights: dict[Branch, float] = Field(default_factory=lambda: {"visual": 1.0, "audio": 0.5, "text": 0.5})
    confused_pairs: int = Field(10, ge=0, description="most confused class pairs to report (Table 8)")
    balance_classes: bool = Field(True, description="weight the loss by inverse class frequency (not in the "
                                  "paper, whose loss is plain CE; mca weighs classes equally, so priors hurt it)")


class RetrievalConfig(_Strict):
    """VTCL: branch features → 2-layer MLP → d; frozen title embedding → 2-layer MLP → d."""

    data: DataConfig = Field(default_factory=lambda: DataConfig(batch_size=32))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    modalities: list[Branch] = Field(default_factory=lambda: list(BRANCHES))
    ablation: list[list[Branch]] = Field(
        default_factory=lambda: [["visual"], ["visual", "audio"], ["visual", "text"], ["visual", "audio", "text"]],
        description="modality sets trained for Table 6/7; [] trains only `modalities`")
    visual: VisualConfig = Field(default_factory=VisualConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    dim: int = Field(256, ge=8, description="joint embedding size d")
    hidden: int = Field(512, ge=8)
    temperature: float = Field(0.05, gt=0)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=30, lr=1e-3))
    subsets: int = Field(20, ge=1)
    subset_size: int = Field(1000, ge=2)
    zero_shot: bool = True
    text_model: str | None = Field(None, description="text-stage encoder for class names (its `model` setting); "
                                   "None = the encoder recorded in the shards' text.json")

    @model_validator(mode="after")
    def _visual_first(self) -> RetrievalConfig:
        for combo in [self.modalities, *self.ablation]:
            if not combo:
                raise ValueError("a modality set may not be empty")
        return self


def load_yaml(cls: type[_Strict], path: str | Path | None, overrides: dict[str, Any] | None = None) -> Any:
    """A config from YAML (optional) with dotted overrides, e.g. {"data.shards": "/x", "run.seed": 1}."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return cls.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"bad {cls.__name__}: {exc}") from exc


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
