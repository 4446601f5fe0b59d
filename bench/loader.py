"""Training-loader throughput from packed shards vs decoding the same videos from scratch.

    .venv/bin/python bench/loader.py --output /tmp/xo --manifest /tmp/x/manifest.csv [--split train]

Rows (samples/s, higher is better):
  shards: raw tar      webdataset read of the split, no parsing
  shards: loader       one training epoch of the topic loader: parse members, TSN frame choice,
                       mel crop, augmentation, batching — what `usv train topic` consumes
  decode: from scratch ffprobe + 1 fps frames (short side 480) + 16 kHz audio + log-Mel with the
                       build's own decoders; a *lower bound* on recomputing features, which would
                       also run CLIP / OCR / the text encoder on top
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import webdataset as wds

from extractors.base import make_stage
from extractors.media import decode_audio, decode_frames, probe, working_size
from storage.manifest import load_manifest
from training.config import AudioConfig, AugmentConfig, DataConfig, TextConfig, VisualConfig
from training.data import ShardSet, train_stream
from training.inputs import Inputs, missing_reason


def bench_raw(urls: list[str]) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        n += 1
    return n, time.perf_counter() - t0


def bench_loader(shards: ShardSet, split: str, workers: int, batch: int) -> tuple[int, float, list[str]]:
    branches = [b for b in ("visual", "audio", "text") if missing_reason(shards, b) is None]
    inputs = Inputs(branches, visual=VisualConfig(), audio=AudioConfig(), text=TextConfig(), augment=AugmentConfig())
    cfg = DataConfig(shards=shards.root, batch_size=batch, num_workers=workers)
    t0, n = time.perf_counter(), 0
    batches, _ = train_stream(shards.split(split), inputs.transform(train=True), cfg, seed=0, epoch=0)
    for b in batches:
        n += len(b["__key__"])
    return n, time.perf_counter() - t0, branches


def bench_decode(sources: list[str]) -> tuple[int, float, float]:
    mel = make_stage("mel")
    t0, seconds = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory(prefix="usv-bench-") as tmp:
        for i, src in enumerate(sources):
            meta = probe(src)
            size = working_size(meta.width or 2, meta.height or 2, 480, 1280)
            decode_frames(src, meta, 1.0, size, Path(tmp) / f"{i}.rgb")
            audio = decode_audio(src)
            transform = mel._transform(16000)  # the mel stage's own transform
            with torch.no_grad():
                torch.log(transform(torch.from_numpy(audio)) + mel.config.floor)
            seconds += float(meta.duration or 0.0)
    return len(sources), time.perf_counter() - t0, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="build output root (holds shards/)")
    ap.add_argument("--manifest", required=True, help="the manifest the build read (for the video sources)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the loader row")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="loader epochs (best is reported)")
    args = ap.parse_args()

    shards = ShardSet.open(args.output)
    split = shards.split(args.split)
    raw = min((bench_raw(split.urls) for _ in range(args.repeat)), key=lambda r: r[1])
    loader = min((bench_loader(shards, args.split, args.workers, args.batch) for _ in range(args.repeat)),
                 key=lambda r: r[1])
    ids = {s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(split.urls), wds.tarfile_to_samples())}
    sources = [r.source for r in load_manifest(args.manifest).rows if r.video_id in ids]
    dec = bench_decode(sources)
    rows = [("shards: raw tar", raw[0], raw[1]), (f"shards: loader ({'+'.join(loader[2])})", loader[0], loader[1]),
            ("decode: from scratch", dec[0], dec[1])]
    print(f"split {args.split}: {split.samples} samples in {len(split.urls)} shard(s); "
          f"{dec[2]:.0f} s of video; loader workers={args.workers}")
    print(f"{'path':<40}{'samples':>9}{'seconds':>10}{'samples/s':>12}")
    for name, n, sec in rows:
        print(f"{name:<40}{n:>9}{sec:>10.3f}{n / sec:>12.1f}")
    print(f"loader / decode speed-up: {(loader[0] / loader[1]) / (dec[0] / dec[1]):.0f}x")


if __name__ == "__main__":
    main()
