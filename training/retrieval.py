"""VTCL video–title retrieval (paper §4.3, Tables 6 and 7).

The video encoder concatenates the branch features (TSN over CLIP frames, the audio CNN over
log-Mel, the frozen subtitle embedding through its head) and projects them with a 2-layer MLP;
the title's frozen embedding (`text.npy` row 0) goes through another 2-layer MLP; both land in
a d-dimensional space trained with symmetric InfoNCE at temperature 0.05. One model is trained
per modality set of the ablation (V, V+A, V+T, V+A+T). Evaluation: R@1/5/10 and median rank in
both directions averaged over disjoint random subsets of the eval split, and zero-shot topic
recognition by embedding the class names with the same frozen text encoder as the titles.
Under DDP the InfoNCE negatives are those of each rank's own batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import RetrievalConfig
from training.data import ShardSet, Split, class_list, eval_batches, iterate_raw, load_member, train_stream
from training.engine import Dist, barrier, broadcast, fit, seed_all, setup, teardown, to_device
from training.inputs import Inputs, input_dims, missing_reason
from training.metrics import classification, retrieval, subset_plan
from training.models import VTCL, build_branch, info_nce
from training.runs import Run, plot_losses
from usv.errors import ConfigError

log = logging.getLogger("usv.training")


class _Pair(nn.Module):
    """DDP needs one forward that yields both towers' outputs."""

    def __init__(self, model: VTCL) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.video(batch), self.model.title(batch["title"])


def combo_name(combo: list[str]) -> str:
    return "+".join(sorted(combo, key=["visual", "audio", "text"].index))


def build_vtcl(cfg: RetrievalConfig, combo: list[str], dims: dict[str, int]) -> VTCL:
    branches = {}
    for b in combo:
        m = build_branch(b, dims, 1, cfg.visual, cfg.audio, cfg.text)
        m.fc = nn.Identity()  # features only: no classifier in retrieval
        branches[b] = m
    return VTCL(branches, dims["title"], cfg.hidden, cfg.dim)


def _inputs(cfg: RetrievalConfig, combo: list[str], classes: list[str] | None = None) -> Inputs:
    return Inputs([*combo, "title"], visual=cfg.visual, audio=cfg.audio, text=cfg.text, augment=cfg.augment,
                  classes=classes)


def _combos(cfg: RetrievalConfig) -> list[list[str]]:
    out: list[list[str]] = []
    for c in cfg.ablation or [cfg.modalities]:
        if combo_name(list(c)) not in {combo_name(o) for o in out}:
            out.append(list(c))
    return out


def train_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    d = setup(cfg.run.device)
    try:
        return _train(cfg, d)
    finally:
        teardown(d)


def _train(cfg: RetrievalConfig, d: Dist) -> dict[str, Any]:
    shards = ShardSet.open(cfg.data.shards)
    if reason := missing_reason(shards, "title"):
        raise ConfigError(f"retrieval needs title embeddings — {reason}")
    run = Run.create(cfg.run, "retrieval", broadcast(cfg.run.name or f"retrieval-{time.strftime('%Y%m%d-%H%M%S')}",
                                                     d))
    classes = class_list(shards, cfg.data.train_split)
    if d.main:
        run.save_config(cfg, "retrieval")
        run.write_json("classes.json", classes)
    train = shards.split(cfg.data.train_split)
    histories: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for combo in _combos(cfg):
        name = combo_name(combo)
        reasons = [r for b in combo if (r := missing_reason(shards, b))]
        if reasons:
            log.warning("skipping modality set %s — %s", name, "; ".join(reasons))
            skipped[name] = "; ".join(reasons)
            continue
        inputs = _inputs(cfg, combo)
        dims = input_dims(shards, cfg.data.train_split, [*combo, "title"], inputs)
        seed_all(cfg.run.seed)
        model = build_vtcl(cfg, combo, dims)
        transform = inputs.transform(train=True)

        def stream(epoch: int, transform: Any = transform) -> tuple[Iterator[dict[str, Any]], int]:
            return train_stream(train, transform, cfg.data, seed=cfg.run.seed, epoch=epoch, rank=d.rank,
                                world=d.world)

        def loss(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            v, t = net(batch)
            return info_nce(v, t, cfg.temperature)

        histories[name] = fit(_Pair(model), loss, stream, cfg.optim, d, cfg.run.amp, f"vtcl {name}")
        if d.main:
            run.save_checkpoint(f"vtcl-{name}", model, {"dims": dims, "combo": combo})
    metrics: dict[str, Any] = {"skipped": skipped}
    if d.main:
        run.write_json("history.json", {"loss": histories, "skipped": skipped})
        plot_losses(run.path / "plots" / "loss.png", histories, "VTCL (InfoNCE)")
        if histories:
            metrics = evaluate_retrieval(run.path, device=str(d.device))
    barrier(d)
    return {"run": str(run.path), **metrics}


@torch.no_grad()
def embed(model: VTCL, batches: Iterator[dict[str, Any]], device: torch.device
          ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Keys, labels, video and title embeddings of a split (test-time inputs: 24 frames, 10 clips)."""
    keys, labels, videos, titles = [], [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        keys += batch["__key__"]
        labels.append(batch["label"].cpu().numpy())
        videos.append(model.video(batch).cpu().numpy())
        titles.append(model.title(batch["title"]).cpu().numpy())
    if not keys:
        raise ConfigError("the eval split has no sample with every member this model reads")
    return keys, np.concatenate(labels), np.concatenate(videos), np.concatenate(titles)


def title_model(split: Split) -> str | None:
    """The encoder the text stage recorded in text.json (class names must share the title space)."""
    for sample in iterate_raw(split.urls):
        if info := load_member(sample, "text.json"):
            return info.get("model")
    return None


def evaluate_retrieval(run_dir: str | Path, shards: str | None = None, split: str | None = None,
                       device: str = "cpu", write: bool = True) -> dict[str, Any]:
    """Table 6 (R@K, MedR both ways) and Table 7 (zero-shot mca) for every trained modality set."""
    run = Run(Path(run_dir))
    cfg, classes, eval_split = run.for_eval(RetrievalConfig, shards, split)
    dev = torch.device(device)
    class_emb = None
    if cfg.zero_shot:
        from extractors.text import embed_texts  # the text stage's own encoder: class names join the title space

        model = cfg.text_model or title_model(eval_split)
        class_emb = np.asarray(embed_texts(classes, model) if model else embed_texts(classes), dtype=np.float32)
    table6, table7 = {}, {}
    for ckpt in sorted(run.checkpoints(), key=lambda c: (c.count("+"), c != "vtcl-visual", c)):
        state, meta = run.load_checkpoint(ckpt)
        model = build_vtcl(cfg, meta["combo"], meta["dims"])
        model.load_state_dict(state)
        model.to(dev).eval()
        transform = _inputs(cfg, meta["combo"], classes).transform(train=False)
        _, labels, video, title = embed(model, eval_batches(eval_split, transform, cfg.data.batch_size), dev)
        plan = subset_plan(len(video), cfg.subsets, cfg.subset_size, cfg.run.seed)
        name = combo_name(meta["combo"])
        table6[name] = retrieval(video, title, plan)
        if class_emb is not None:
            if class_emb.shape[1] != meta["dims"]["title"]:
                raise ConfigError(f"zero-shot: the class-name encoder gives {class_emb.shape[1]}-d vectors but the "
                                  f"titles in text.npy are {meta['dims']['title']}-d; set text_model to the text "
                                  "stage's encoder, or zero_shot: false")
            with torch.no_grad():
                protos = model.title(torch.from_numpy(class_emb).to(dev)).cpu().numpy()
            table7[name] = classification(labels, video @ protos.T)
    try:
        skipped = run.read_json("history.json").get("skipped", {})
    except FileNotFoundError:
        skipped = {}
    metrics = {"task": "retrieval", "eval_split": eval_split.name, "table6": table6, "table7_zero_shot": table7,
               "skipped": skipped}
    if write:
        run.write_json("metrics.json", metrics)
    return metrics


def table6(metrics: dict[str, Any]) -> str:
    lines = [f"{'modalities':<20}{'dir':<8}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>7}{'zs-mca':>8}"]
    for name, m in metrics.get("table6", {}).items():
        zs = metrics.get("table7_zero_shot", {}).get(name, {}).get("mca", float("nan"))
        for direction, short in (("video_to_title", "V→T"), ("title_to_video", "T→V")):
            r = m[direction]
            lines.append(f"{name:<20}{short:<8}{r['R@1']:>8.2f}{r['R@5']:>8.2f}{r['R@10']:>8.2f}{r['MedR']:>7.1f}"
                         f"{zs:>8.2f}")
    return "\n".join(lines)
