"""The paper's metrics: mean class accuracy and top-1 (Table 5), most confused class pairs
(Table 8), retrieval recall@K and median rank averaged over random subsets (Table 6)."""

from __future__ import annotations

import logging
from itertools import combinations
from typing import Any

import numpy as np

log = logging.getLogger("usv.training")


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (labels, preds), 1)
    return out


def classification(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """mca (mean over the classes present of per-class recall; the paper's metric, since classes
    are unbalanced) and top-1, both in percent."""
    preds = scores.argmax(axis=1)
    present = np.unique(labels)
    per_class = [float((preds[labels == c] == c).mean()) for c in present]
    return {"mca": 100.0 * float(np.mean(per_class)) if per_class else 0.0,
            "top1": 100.0 * float((preds == labels).mean()) if len(labels) else 0.0, "n": len(labels)}


def confused_pairs(conf: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The k largest off-diagonal rates: share of class 1's videos predicted as class 2."""
    rates = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    pairs = [(float(rates[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
             if i != j and conf[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"class1": classes[i], "class2": classes[j], "confusion": round(100 * r, 2)} for r, i, j in pairs[:k]]


def fuse(scores: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, np.ndarray]:
    """Late fusion (paper eq. 4) for every non-empty combination of branches, keyed 'audio+visual'."""
    out: dict[str, np.ndarray] = {}
    names = sorted(scores, key=["visual", "audio", "text"].index)
    for r in range(1, len(names) + 1):
        for combo in combinations(names, r):
            out["+".join(combo)] = sum(weights.get(b, 1.0) * scores[b] for b in combo) / 3.0
    return out


def ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of the matching item (the diagonal) in each row; ties count against it, so
    degenerate (identical) embeddings score as chance, not as perfect."""
    diag = np.diag(sim)[:, None]
    return (sim >= diag).sum(axis=1)


def recall_table(r: np.ndarray) -> dict[str, float]:
    return {"R@1": 100 * float((r <= 1).mean()), "R@5": 100 * float((r <= 5).mean()),
            "R@10": 100 * float((r <= 10).mean()), "MedR": float(np.median(r))}


def subset_plan(n: int, subsets: int, size: int, seed: int) -> list[np.ndarray]:
    """Disjoint random subsets of the eval pairs (paper: 20 × 1,000); scaled down with a warning."""
    want_size, want_count = size, subsets
    size = min(size, n)
    count = max(1, min(subsets, n // max(size, 1)))
    if (size, count) != (want_size, want_count):
        log.warning("retrieval eval: %d pairs cannot fill %d subsets of %d; using %d subset(s) of %d "
                    "(chance R@1 = %.1f%%)", n, want_count, want_size, count, size, 100 / max(size, 1))
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i * size:(i + 1) * size] for i in range(count)]


def retrieval(video: np.ndarray, title: np.ndarray, plan: list[np.ndarray]) -> dict[str, Any]:
    """R@1/5/10 and MedR in both directions, averaged over the subsets of `plan`."""
    v2t, t2v = [], []
    for idx in plan:
        sim = video[idx] @ title[idx].T
        v2t.append(recall_table(ranks(sim)))
        t2v.append(recall_table(ranks(sim.T)))

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}

    size = len(plan[0])
    return {"video_to_title": mean(v2t), "title_to_video": mean(t2v), "subsets": len(plan), "subset_size": size,
            "chance_R@1": round(100 / size, 4)}
