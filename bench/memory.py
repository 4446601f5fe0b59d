"""Peak memory of `usv build` as the corpus grows: 10, 100 and 1,000 small synthetic videos.

The target is a flat curve (within 20 % from 100 to 1,000 videos): a build holds one decode
chunk of arrays at a time and writes everything else to disk, so memory must not grow with
the manifest. To keep 1,000 videos feasible on 2 cores the videos are tiny (3 s, 160×90;
3 s is the generator's minimum) and the stages are the cheap ones, `meta,mel,frames`:
this measures the pipeline's own bookkeeping (manifest, plan, ledger, Prefect tasks, packer),
not model weights, which are a constant per worker.

Also home of `run_measured`, the wall-time and peak-RSS probe the race uses: it samples the
resident memory of a command's whole process tree (ffmpeg children included) every 50 ms.

Run: `.venv/bin/python -m bench.memory [--sizes 10,100,1000]` (or `python -m bench.race --memory`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "data" / "bench"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYANNOTE_METRICS_ENABLED": "false",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


@dataclass
class Measured:
    wall: float
    peak_rss: int  # bytes, summed over the process tree at the worst sample
    rc: int
    output: str
    started_at: float = 0.0  # time.time() at launch, to place ledger timestamps


def _tree_rss(proc: psutil.Process) -> int:
    """RSS summed over a process tree, leaving out children caught between fork and exec: they
    still run their parent's image (same command line) and share all its pages, so counting them
    would double the parent for one sample (PSS would be exact, but costs ≈5–10 ms per read)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    cmdlines: dict[int, list[str]] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmdlines[p.pid] = p.cmdline()
            if p is not proc and cmdlines[p.pid] == cmdlines.get(p.ppid()):
                continue
            total += p.memory_info().rss
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.05) -> Measured:
    """Run `cmd`, returning its wall time, the peak RSS of its process tree, exit code and output."""
    with tempfile.TemporaryFile() as log:
        t0, started_at = time.perf_counter(), time.time()
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, **ENV, **(env or {})})
        proc, peak = psutil.Process(popen.pid), 0
        while popen.poll() is None:
            peak = max(peak, _tree_rss(proc))
            time.sleep(interval)
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read().decode(errors="replace")
    return Measured(wall, peak, popen.returncode, output, started_at)


def usv_build(manifest: Path, output: Path, stages: str, config: Path | None = None,
              env: dict[str, str] | None = None) -> Measured:
    """`usv build` as a user runs it, in its own process (so its memory is its own)."""
    cmd = [sys.executable, "-m", "usv.cli", "build", str(manifest), "--output", str(output), "--stages", stages]
    if config is not None:
        cmd += ["--config", str(config)]
    result = run_measured(cmd, env)
    if result.rc != 0:
        raise RuntimeError(f"usv build failed (rc={result.rc}):\n{result.output[-3000:]}")
    return result


def tiny_corpus(n: int, work: Path = WORK) -> Path:
    """A manifest of `n` tiny videos: 10 made by `make_corpus` once, the rest stream-copied remuxes of
    them with a distinct title tag, so every row is its own file with its own content hash."""
    from usv.synth import make_corpus

    base = work / "tiny-10"
    if not (base / "manifest.csv").exists():
        make_corpus(base, topics=5, per_topic=2, seconds=3.0, seed=0, width=160, height=90)
    rows = list(csv.DictReader((base / "manifest.csv").open()))
    out = work / f"tiny-{n}"
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    if manifest.exists():
        return manifest
    made = []
    for i in range(n):
        src = dict(rows[i % len(rows)])
        dst = videos / f"v{i:05d}.mp4"
        if not dst.exists():  # remux with a distinct title tag: same streams, distinct bytes, fast
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(base / src["source"]), "-c", "copy",
                            "-metadata", f"title=copy {i}", str(dst)], check=True)
        made.append({**src, "video_id": f"v{i:05d}", "source": f"videos/{dst.name}"})
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(made)
    return manifest


def memory_table(sizes: list[int], work: Path = WORK, stages: str = "meta,mel,frames") -> list[dict[str, float]]:
    """Peak RSS of a fresh `usv build` per corpus size."""
    out = []
    for n in sizes:
        manifest = tiny_corpus(n, work)
        with tempfile.TemporaryDirectory(prefix=f"usv-mem-{n}-", dir=work) as root:
            m = usv_build(manifest, Path(root) / "out", stages)
        out.append({"videos": n, "wall_s": round(m.wall, 1), "peak_rss_mib": round(m.peak_rss / 2**20, 1),
                    "videos_per_hour": round(3600 * n / m.wall)})
        print(f"  {n} videos: {m.wall:.1f} s, peak RSS {m.peak_rss / 2**20:.0f} MiB", flush=True)
    return out


def format_memory(rows: list[dict[str, float]], stages: str = "meta,mel,frames") -> str:
    lines = [f"Peak memory of `usv build` (3 s 160x90 synthetic videos, stages {stages}, fresh output root)",
             f"{'videos':>8} {'wall s':>8} {'videos/h':>9} {'peak RSS MiB':>13}"]
    lines += [f"{r['videos']:>8} {r['wall_s']:>8} {r['videos_per_hour']:>9} {r['peak_rss_mib']:>13}" for r in rows]
    by = {r["videos"]: r["peak_rss_mib"] for r in rows}
    if 100 in by and 1000 in by:
        growth = by[1000] / by[100] - 1
        verdict = "met" if growth <= 0.20 else "MISSED"
        lines.append(f"100 -> 1,000 videos: {growth:+.1%} (target flat within 20%: {verdict})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="peak memory of usv build at growing corpus sizes")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = memory_table([int(s) for s in args.sizes.split(",")], args.work)
    print(format_memory(rows))
    (args.work / "memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
