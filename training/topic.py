"""MMF-Net topic recognition: three branches trained separately, fused late (paper §4.2, A.1).

Each branch is trained with cross-entropy on its own input stream from the shards; at test
time a branch's score is the softmax averaged over its clips (eq. 3) and branches are fused
as Σ w_k s_k / 3 (eq. 4, weights 1 / 0.5 / 0.5). `evaluate_topic` rebuilds every model from
its checkpoint and scores the eval split, so `usv eval RUN` reproduces `metrics.json` exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import TopicConfig
from training.data import ShardSet, class_counts, eval_batches, train_stream
from training.engine import Dist, barrier, broadcast, fit, seed_all, setup, teardown, to_device
from training.inputs import Inputs, input_dims, missing_reason
from training.metrics import classification, confused_pairs, confusion, fuse
from training.models import build_branch
from training.runs import Run, plot_confusion, plot_losses

log = logging.getLogger("usv.training")


def _inputs(cfg: TopicConfig, branch: str, classes: list[str]) -> Inputs:
    return Inputs([branch], visual=cfg.visual, audio=cfg.audio, text=cfg.text, augment=cfg.augment, classes=classes)


def train_topic(cfg: TopicConfig) -> dict[str, Any]:
    """Train every available branch, then (rank 0) evaluate and write the run folder."""
    d = setup(cfg.run.device)
    try:
        return _train(cfg, d)
    finally:
        teardown(d)


def _train(cfg: TopicConfig, d: Dist) -> dict[str, Any]:
    seed_all(cfg.run.seed)
    shards = ShardSet.open(cfg.data.shards)
    counts = class_counts(shards, cfg.data.train_split)
    classes = list(counts)
    freq = torch.tensor([counts[c] for c in classes], dtype=torch.float32)
    class_weight = (freq.sum() / (len(classes) * freq)).to(d.device) if cfg.balance_classes else None
    run = Run.create(cfg.run, "topic", broadcast(cfg.run.name or f"topic-{time.strftime('%Y%m%d-%H%M%S')}", d))
    if d.main:
        run.save_config(cfg, "topic")
        run.write_json("classes.json", classes)
        run.write_json("class_counts.json", counts)
    train = shards.split(cfg.data.train_split)
    histories: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for branch in cfg.branches:
        if reason := missing_reason(shards, branch):
            log.warning("skipping the %s branch — %s", branch, reason)
            skipped[branch] = reason
            continue
        inputs = _inputs(cfg, branch, classes)
        dims = input_dims(shards, cfg.data.train_split, [branch], inputs)
        seed_all(cfg.run.seed)  # a branch's initialisation does not depend on which branches ran before
        model = build_branch(branch, dims, len(classes), cfg.visual, cfg.audio, cfg.text)
        transform = inputs.transform(train=True)

        def stream(epoch: int, transform: Any = transform) -> tuple[Iterator[dict[str, Any]], int]:
            return train_stream(train, transform, cfg.data, seed=cfg.run.seed, epoch=epoch, rank=d.rank,
                                world=d.world)

        smoothing = getattr(cfg, branch).optim.label_smoothing

        def loss(net: nn.Module, batch: dict[str, Any], branch: str = branch, smoothing: float = smoothing
                 ) -> torch.Tensor:
            return F.cross_entropy(net(batch[branch]).float(), batch["label"], weight=class_weight,
                                   label_smoothing=smoothing)

        histories[branch] = fit(model, loss, stream, getattr(cfg, branch).optim, d, cfg.run.amp, branch)
        if d.main:
            run.save_checkpoint(branch, model, {"dims": dims, "classes": len(classes)})
    metrics: dict[str, Any] = {}
    if d.main:
        run.write_json("history.json", {"loss": histories, "skipped": skipped})
        plot_losses(run.path / "plots" / "loss.png", histories, "MMF-Net branches")
        metrics = evaluate_topic(run.path, device=str(d.device)) if histories else {"skipped": skipped}
    barrier(d)
    return {"run": str(run.path), **metrics}


@torch.no_grad()
def predict(model: nn.Module, batches: Iterator[dict[str, Any]], branch: str,
            device: torch.device) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, labels and softmax scores; multi-clip inputs average their clips' softmax (eq. 3)."""
    keys: list[str] = []
    labels, scores = [], []
    for batch in batches:
        batch = to_device(batch, device)
        x = batch[branch]
        if branch == "audio":  # (B, K, 1, M, T)
            b, k = x.shape[:2]
            probs = F.softmax(model(x.flatten(0, 1)).float(), dim=-1).view(b, k, -1).mean(dim=1)
        else:
            probs = F.softmax(model(x).float(), dim=-1)
        keys += batch["__key__"]
        labels.append(batch["label"].cpu().numpy())
        scores.append(probs.cpu().numpy())
    if not keys:
        return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return keys, np.concatenate(labels), np.concatenate(scores)


def evaluate_topic(run_dir: str | Path, shards: str | None = None, split: str | None = None,
                   device: str = "cpu", write: bool = True) -> dict[str, Any]:
    """Score the eval split with every checkpoint of a run: Table 5 (each branch, pair, all) and Table 8."""
    run = Run(Path(run_dir))
    cfg, classes, eval_split = run.for_eval(TopicConfig, shards, split)
    dev = torch.device(device)
    per_branch: dict[str, dict[str, Any]] = {}
    for branch in run.checkpoints():
        state, meta = run.load_checkpoint(branch)
        model = build_branch(branch, meta["dims"], len(classes), cfg.visual, cfg.audio, cfg.text)
        model.load_state_dict(state)
        model.to(dev).eval()
        inputs = _inputs(cfg, branch, classes)
        keys, labels, scores = predict(model, eval_batches(eval_split, inputs.transform(train=False),
                                                           cfg.data.batch_size), branch, dev)
        per_branch[branch] = {k: (int(lab), s) for k, lab, s in zip(keys, labels, scores, strict=True)}
    if not per_branch:
        return {"error": f"no checkpoints in {run.path}"}
    common = sorted(set.intersection(*(set(v) for v in per_branch.values())))
    labels = np.array([next(iter(per_branch.values()))[k][0] for k in common], dtype=np.int64)
    scores = {b: np.stack([v[k][1] for k in common]) if common else np.zeros((0, len(classes)))
              for b, v in per_branch.items()}
    table, pairs = {}, {}
    for combo, s in fuse(scores, cfg.fusion_weights).items():
        table[combo] = classification(labels, s)
        conf = confusion(labels, s.argmax(axis=1) if len(s) else np.zeros(0, np.int64), len(classes))
        pairs[combo] = confused_pairs(conf, classes, cfg.confused_pairs)
        if write and ("+" not in combo or combo.count("+") == len(scores) - 1):
            plot_confusion(run.path / "plots" / f"confusion-{combo}.png", conf, classes, f"{combo}: confusion")
    try:
        skipped = run.read_json("history.json").get("skipped", {})
    except FileNotFoundError:
        skipped = {}
    metrics = {"task": "topic", "eval_split": eval_split.name, "classes": len(classes), "n_eval": len(common),
               "n_scored": {b: len(v) for b, v in per_branch.items()}, "fusion_weights": cfg.fusion_weights,
               "table5": table, "confused_pairs": pairs, "skipped": skipped}
    if write:
        run.write_json("metrics.json", metrics)
    return metrics


def table5(metrics: dict[str, Any]) -> str:
    """Plain-text rendering of the branch / pair / fusion table."""
    lines = [f"{'branches':<20}{'mca':>8}{'top1':>8}{'n':>6}"]
    for combo, m in metrics.get("table5", {}).items():
        lines.append(f"{combo:<20}{m['mca']:>8.2f}{m['top1']:>8.2f}{m['n']:>6}")
    return "\n".join(lines)
