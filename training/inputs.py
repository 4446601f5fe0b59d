"""What each branch reads from a shard sample, and how it becomes a network input.

visual ← `clip.npy` (N, D) per-second CLIP embeddings: TSN frames (random per segment in training)
audio  ← `mel.npy` (80, T) log-Mel: 2 s crops (one random in training, uniform clips at test)
text   ← `text.npy` (3, D) frozen embeddings of [title, subtitle, transcript]: the chosen fields
         concatenated (never the title: it names the topic)
title  ← `text.npy` row 0, the retrieval target
A branch whose member was not packed is skipped with a message that says how to get it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from training.config import AudioConfig, AugmentConfig, Branch, TextConfig, VisualConfig
from training.data import ShardSet, Transform, load_member, mel_crops, tsn_indices

MEMBERS: dict[str, tuple[str, str]] = {  # input -> (member, stage that makes it)
    "visual": ("clip.npy", "clip"), "audio": ("mel.npy", "mel"), "text": ("text.npy", "text"),
    "title": ("text.npy", "text"),
}
TEXT_ROWS = {"title": 0, "subtitle": 1, "transcript": 2}


def missing_reason(shards: ShardSet, name: str) -> str | None:
    """Why `name` (a branch or "title") cannot run on these shards; None when it can."""
    member, stage = MEMBERS[name]
    if stage in shards.stages:
        return None
    extra = " (the subtitle row also needs the ocr stage)" if name == "text" else ""
    return (f"{name}: the shards at {shards.root} hold no {member} — stage {stage!r} was not packed "
            f"(packed: {', '.join(sorted(shards.stages))}); rebuild with `usv build … --stages …,{stage}`{extra}")


def _text_rows(sample: dict[str, Any], names: list[str]) -> np.ndarray | None:
    emb = load_member(sample, "text.npy")
    if emb is None:
        return None
    info = load_member(sample, "text.json") or {}
    fields = info.get("fields", list(TEXT_ROWS))
    return np.stack([emb[fields.index(n)] for n in names]).astype(np.float32)


class Inputs:
    """Builds the per-sample transform for a set of inputs plus labels."""

    def __init__(self, names: list[str], *, visual: VisualConfig, audio: AudioConfig, text: TextConfig,
                 augment: AugmentConfig, classes: list[str] | None = None) -> None:
        self.names, self.visual, self.audio, self.text, self.augment = names, visual, audio, text, augment
        self.index = {c: i for i, c in enumerate(classes or [])}

    def transform(self, train: bool) -> Transform:
        """`apply` for training (augmented) or test; a partial, so DataLoader workers can pickle it."""
        return functools.partial(self.apply, train=train)

    def apply(self, sample: dict[str, Any], rng: np.random.Generator | None, train: bool) -> dict[str, Any] | None:
        rng = rng if train else None
        out: dict[str, Any] = {}
        if self.index:
            topic = (load_member(sample, "meta.json") or {}).get("topic")
            if topic not in self.index:
                return None  # a topic unseen in training cannot be scored
            out["label"] = np.int64(self.index[topic])
        for name in self.names:
            value = getattr(self, f"_{name}")(sample, rng)
            if value is None:
                return None
            out[name] = value
        return out

    def _visual(self, sample: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray | None:
        clip = load_member(sample, "clip.npy")
        if clip is None or len(clip) == 0:
            return None
        count = self.visual.segments if rng is not None else self.visual.test_frames
        x = clip[tsn_indices(len(clip), count, rng)].astype(np.float32)
        if rng is not None and self.augment.feature_noise:
            x += rng.normal(0, self.augment.feature_noise, x.shape).astype(np.float32)
        return x

    def _audio(self, sample: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray | None:
        mel = load_member(sample, "mel.npy")
        if mel is None or mel.size == 0:
            return None
        clips = 1 if rng is not None else self.audio.test_clips
        x = mel_crops(mel.astype(np.float32), self.audio.crop_frames, clips, rng)
        if rng is None:
            return x
        a = self.augment
        x = x + rng.uniform(-a.mel_gain_db, a.mel_gain_db) * np.log(10) / 10  # gain in dB on a natural-log power
        if a.mel_noise:
            x = x + rng.normal(0, a.mel_noise, x.shape)
        return x[0].astype(np.float32)

    def _text(self, sample: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray | None:
        rows = _text_rows(sample, list(self.text.fields))
        if rows is None:
            return None
        x = rows.reshape(-1)
        if rng is not None and self.augment.feature_noise:
            x = x + rng.normal(0, self.augment.feature_noise, x.shape).astype(np.float32)
        return x

    def _title(self, sample: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray | None:
        rows = _text_rows(sample, ["title"])
        return None if rows is None else rows[0]


def input_dims(shards: ShardSet, split: str, names: list[Branch] | list[str], inputs: Inputs) -> dict[str, int]:
    """Feature sizes of the embedding inputs, read from the first sample that has them."""
    from training.data import iterate_raw

    want = [n for n in names if n in ("visual", "text", "title")]
    dims: dict[str, int] = {}
    fn = inputs.transform(train=False)
    for sample in iterate_raw(shards.split(split).urls):
        out = fn(sample, None) if want else None
        if out is not None:
            for n in want:
                dims[n] = int(out[n].shape[-1])
            return dims
    return dims
