"""A run folder: everything needed to read, reload and re-evaluate a training run.

    <run>/config.yaml              the resolved config (plus `task:`)
    <run>/classes.json             class names, index = model output
    <run>/checkpoints/<name>.safetensors   weights; metadata holds the input sizes
    <run>/history.json             loss per epoch per model
    <run>/metrics.json             evaluation numbers (what `usv eval` reproduces)
    <run>/plots/*.png              loss curves, confusion matrices
Only rank 0 writes. Files are written atomically (storage.atomic), so a killed run never
leaves half a checkpoint under its final name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage.atomic import write_bytes, write_json
from training.config import RetrievalConfig, RunConfig, TopicConfig, to_yaml
from training.data import ShardSet, Split
from usv.errors import ConfigError

C = TypeVar("C", TopicConfig, RetrievalConfig)


class Run:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, task: str, name: str | None = None) -> Run:
        name = name or cfg.name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.output).expanduser().resolve() / name
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (path / "plots").mkdir(exist_ok=True)
        return cls(path)

    def save_config(self, cfg: BaseModel, task: str) -> None:
        write_bytes(str(self.path / "config.yaml"), f"task: {task}\n{to_yaml(cfg)}".encode())

    def load_config(self) -> tuple[str, TopicConfig | RetrievalConfig]:
        try:
            data = yaml.safe_load((self.path / "config.yaml").read_text())
        except OSError as exc:
            raise ConfigError(f"{self.path} is not a run folder (no config.yaml)") from exc
        task = data.pop("task")
        cls = TopicConfig if task == "topic" else RetrievalConfig
        return task, cls.model_validate(data)

    def for_eval(self, task_config: type[C], shards: str | None, split: str | None) -> tuple[C, list[str], Split]:
        """The run's config (checked to be `task_config`), its classes and the split to score."""
        _, cfg = self.load_config()
        if not isinstance(cfg, task_config):
            raise ConfigError(f"{self.path} is not a {task_config.__name__} run")
        classes: list[str] = self.read_json("classes.json")
        eval_split = ShardSet.open(shards or cfg.data.shards).split(split or cfg.data.eval_split)
        return cfg, classes, eval_split

    def write_json(self, name: str, obj: Any) -> None:
        write_json(str(self.path / name), obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def save_checkpoint(self, name: str, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_bytes(str(self.path / "checkpoints" / f"{name}.safetensors"),
                    st_save(state, metadata={"meta": json.dumps(meta, sort_keys=True)}))

    def checkpoints(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "checkpoints").glob("*.safetensors"))

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors import safe_open

        path = self.path / "checkpoints" / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        return st_load(path.read_bytes()), meta


def plot_losses(path: Path, histories: dict[str, list[float]], title: str) -> None:
    """One loss curve per trained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in histories.items():
        ax.plot(range(1, len(hist) + 1), hist, marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(path: Path, confusion: np.ndarray, classes: list[str], title: str) -> None:
    """Row-normalised confusion matrix (rows: true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
