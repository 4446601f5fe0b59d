"""The networks: MMF-Net's three branch heads and VTCL's projection towers.

Every branch maps its input to a feature vector (`features`) and to class logits (`forward`),
so the same module serves topic recognition (logits) and retrieval (features, concatenated).
Visual and text run on frozen, cached embeddings (CLIP frames; sentence embeddings), so their
trainable part is a head; audio is a ResNet-18-style CNN trained from scratch on log-Mel crops,
as in the paper (width is a setting: 64 is ResNet-18, 16 keeps CPU runs short).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import AudioConfig, TextConfig, VisualConfig


def _mlp(dim_in: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    if hidden == 0:
        return nn.Identity(), dim_in
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)), hidden


class TSNHead(nn.Module):
    """Segment consensus: a shared per-frame head, frame scores averaged (TSN's average consensus)."""

    def __init__(self, dim_in: int, num_classes: int, cfg: VisualConfig) -> None:
        super().__init__()
        self.trunk, self.dim = _mlp(dim_in, cfg.hidden, cfg.dropout)
        self.fc = nn.Linear(self.dim, max(num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H)
        return self.trunk(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x)).mean(dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.down(x), inplace=True)


class AudioResNet(nn.Module):
    """ResNet-18 layout (stem, 4 stages of BasicBlocks, global pool) on 1×80×128 log-Mel."""

    def __init__(self, num_classes: int, cfg: AudioConfig) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        cin = w
        for i, n in enumerate(cfg.blocks):
            cout = w * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.dim = cin
        self.norm = nn.BatchNorm2d(1)  # log-Mel levels normalised with running statistics
        self.fc = nn.Linear(cin, max(num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, M, T) -> (B, C); (B, K, 1, M, T) clips are averaged in feature space."""
        if x.dim() == 5:
            b, k = x.shape[:2]
            return self.features(x.flatten(0, 1)).view(b, k, -1).mean(dim=1)
        y = self.body(self.stem(self.norm(x)))
        return y.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, M, T) -> logits; test clips are scored one by one and their softmax averaged (eq. 3)."""
        return self.fc(self.features(x))


class TextHead(nn.Module):
    """A classifier on frozen sentence embeddings of the subtitle (and transcript)."""

    def __init__(self, dim_in: int, num_classes: int, cfg: TextConfig) -> None:
        super().__init__()
        self.trunk, self.dim = _mlp(dim_in, cfg.hidden, cfg.dropout)
        self.fc = nn.Linear(self.dim, max(num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_branch(branch: str, dims: dict[str, int], num_classes: int, visual: VisualConfig,
                 audio: AudioConfig, text: TextConfig) -> nn.Module:
    if branch == "visual":
        return TSNHead(dims["visual"], num_classes, visual)
    if branch == "audio":
        return AudioResNet(num_classes, audio)
    if branch == "text":
        return TextHead(dims["text"], num_classes, text)
    raise ValueError(f"unknown branch {branch!r}")


def projection(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    """The paper's 2-layer MLP into the joint space."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


class VTCL(nn.Module):
    """Video = concatenated branch features → MLP → d; title embedding → MLP → d; cosine similarity."""

    def __init__(self, branches: dict[str, nn.Module], title_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.order = sorted(branches)
        self.branches = nn.ModuleDict(branches)
        total = sum(int(getattr(m, "dim", 0)) for m in branches.values())
        self.video_proj = projection(total, hidden, dim)
        self.title_proj = projection(title_dim, hidden, dim)

    def video(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = [self.branches[b].features(batch[b]) for b in self.order]
        return F.normalize(self.video_proj(torch.cat(feats, dim=1)).float(), dim=-1)

    def title(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.title_proj(emb).float(), dim=-1)


def info_nce(v: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (video, title) pairs (paper eq. 2, both directions)."""
    logits = v @ t.T / temperature
    target = torch.arange(len(v), device=v.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
