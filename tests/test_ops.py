"""Incremental and exact (shown with ledger counts), per-video deadlines and memory limits,
and `usv status` / `usv retry`, on a tiny synthetic corpus with the cheap stages, without Prefect."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import test_ops_stages  # noqa: F401 - registers the test-only stages
import webdataset as wds
from typer.testing import CliRunner

from flows.pipeline import load_stages, process_batch
from storage.atomic import join, write_json
from storage.ledger import Ledger
from storage.manifest import load_manifest
from storage.pack import Packer
from usv.cli import app
from usv.config import BuildConfig
from usv.errors import ErrorKind
from usv.synth import make_corpus

CHEAP = ["meta", "mel", "frames"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("ops-corpus"), topics=2, per_topic=2, seconds=3)


def write_manifest(src: Path, dst: Path, keep: Sequence[str] | None = None, titles: dict[str, str] | None = None
                   ) -> Path:
    """A copy of `src` with absolute sources, only the `keep` ids, and some titles changed."""
    with open(src) as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if keep is None or r["video_id"] in keep]
    for r in rows:
        r["source"] = str((src.parent / r["source"]).resolve())
        r["title"] = (titles or {}).get(r["video_id"], r["title"])
    with open(dst, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def build(root: Path, manifest: Path, run_id: str, **settings: object) -> dict[str, Counter[str]]:
    """What `build-usv` does, without Prefect: extract, record the config, pack. Returns the
    run's ledger counts per stage (ok / cached / error:kind)."""
    cfg = BuildConfig.model_validate({"output": str(root), "manifest": str(manifest), "stages": CHEAP,
                                      "batch_size": 64, **settings})
    write_json(join(cfg.output, "state", "build.json"), {"run_id": run_id, "config": cfg.model_dump(mode="json")})
    process_batch(load_manifest(cfg.manifest).rows, cfg, run_id)
    Packer(cfg.output, load_stages(cfg), cfg.pack).pack(load_manifest(cfg.manifest))
    return run_counts(root, run_id)


def run_counts(root: Path, run_id: str) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for r in Ledger(str(root)).table(run_id).to_pylist():
        label = f"error:{r['error_kind']}" if r["status"] == "error" else r["status"]
        out.setdefault(r["stage"], Counter())[label] += 1
    return out


def shard_samples(root: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in every shard of every split, by key (a duplicate key fails the test)."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted((root / "shards").glob("*/*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            assert sample["__key__"] not in out, f"{sample['__key__']} packed twice"
            out[sample["__key__"]] = sample
    return out


def test_changed_config_reruns_only_that_stage_and_its_dependents(corpus: Path, tmp_path: Path) -> None:
    root, stages = tmp_path / "out", [*CHEAP, "melstats"]
    first = build(root, corpus, "r1", stages=stages)
    assert all(first[s] == {"ok": 4} for s in ["ingest", *stages]), first
    again = build(root, corpus, "r2", stages=stages)
    assert all(again[s] == {"cached": 4} for s in ["ingest", *stages]), again

    frames = build(root, corpus, "r3", stages=stages, stage_config={"frames": {"quality": 60}})
    assert frames["frames"] == {"ok": 4}
    assert all(frames[s] == {"cached": 4} for s in ["meta", "mel", "melstats"]), frames

    mel = build(root, corpus, "r4", stages=stages, stage_config={"frames": {"quality": 60}, "mel": {"n_mels": 64}})
    assert mel["mel"] == {"ok": 4} and mel["melstats"] == {"ok": 4}, mel  # melstats reads mel
    assert mel["meta"] == {"cached": 4} and mel["frames"] == {"cached": 4}, mel
    sample = next(iter(shard_samples(root).values()))
    assert np.load(io.BytesIO(sample["mel.npy"])).shape[0] == 64
    assert np.load(io.BytesIO(sample["melstats.npy"])).shape == (64,)


def test_changed_title_reruns_meta_for_that_video_only(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    build(root, corpus, "r1")
    renamed = write_manifest(corpus, tmp_path / "m.csv", titles={"t0-v1": "a brand new title"})
    counts = build(root, renamed, "r2")
    assert counts["meta"] == {"ok": 1, "cached": 3}, counts
    assert counts["mel"] == {"cached": 4} and counts["frames"] == {"cached": 4}, counts
    assert json.loads(shard_samples(root)["t0-v1"]["meta.json"])["title"] == "a brand new title"


def test_added_videos_are_the_only_work_and_removed_ones_leave_the_shards(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    two = write_manifest(corpus, tmp_path / "two.csv", keep=["t0-v0", "t1-v0"])
    assert build(root, two, "r1")["mel"] == {"ok": 2}
    counts = build(root, corpus, "r2")
    assert all(counts[s] == {"ok": 2, "cached": 2} for s in ["ingest", *CHEAP]), counts
    assert set(shard_samples(root)) == {"t0-v0", "t0-v1", "t1-v0", "t1-v1"}

    three = write_manifest(corpus, tmp_path / "three.csv", keep=["t0-v0", "t0-v1", "t1-v0"])
    counts = build(root, three, "r3")
    assert all(counts[s] == {"cached": 3} for s in ["ingest", *CHEAP]), counts
    assert set(shard_samples(root)) == {"t0-v0", "t0-v1", "t1-v0"}
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(root / "tables" / "videos.parquet")["video_id"].to_pylist()) == [
        "t0-v0", "t0-v1", "t1-v0"]
    assert build(root, corpus, "r4")["mel"] == {"cached": 4}  # its features stayed in the store


def test_timeout_and_oom_are_recorded_and_the_batch_goes_on(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    t0 = time.perf_counter()
    counts = build(root, corpus, "r1", stages=["meta", "sleepy"],
                   stage_config={"sleepy": {"slow_id": "t0-v1", "hog_id": "t1-v0"}},
                   stage_timeout_s={"sleepy": 1.5}, stage_memory_gb={"sleepy": 2})
    took = time.perf_counter() - t0
    assert counts["sleepy"] == {"ok": 2, "error:timeout": 1, "error:oom": 1}, counts
    assert counts["meta"] == {"ok": 4}
    assert took < 25, f"the deadline did not cut the 30 s sleep short: {took:.1f} s"
    rows = {(r["video_id"], r["stage"]): r for r in Ledger(str(root)).latest().to_pylist()}
    assert rows[("t0-v1", "sleepy")]["error_kind"] == ErrorKind.TIMEOUT.value
    assert "stage_timeout_s" in rows[("t0-v1", "sleepy")]["message"]
    assert "MemoryError" in rows[("t1-v0", "sleepy")]["message"]
    samples = shard_samples(root)
    assert "sleepy.json" in samples["t0-v0"] and "sleepy.json" not in samples["t0-v1"]


def test_status_and_retry(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    settings = {"stages": ["meta", "sleepy", "sleepyecho"],
                "stage_config": {"sleepy": {"slow_id": "t0-v1", "sleep_s": 3}},
                "stage_timeout_s": {"sleepy": 1.0}}
    build(root, corpus, "r1", **settings)
    runner = CliRunner()
    res = runner.invoke(app, ["status", str(root), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    sleepy = st["stages"]["sleepy"]
    assert sleepy["done"] == 3 and sleepy["failed"] == 1 and sleepy["pending"] == []
    assert sleepy["errors"]["timeout"]["videos"] == ["t0-v1"]
    assert st["stages"]["meta"]["done"] == 4 and st["last_run_counts"]["sleepy"]["error:timeout"] == 1
    assert {s["video_id"] for s in sleepy["slowest"]} <= {"t0-v0", "t1-v0", "t1-v1"}

    bigger = write_manifest(corpus, tmp_path / "m.csv")  # same videos, one more pending row below
    with open(bigger, "a") as fh:
        fh.write(f"extra,{(corpus.parent / 'videos').resolve()}/missing.mp4,t,topic0,,,,\n")
    st = json.loads(runner.invoke(app, ["status", str(root), "--manifest", str(bigger), "--json"]).output)
    assert st["stages"]["sleepy"]["pending"] == ["extra"] and st["stages"]["ingest"]["pending"] == ["extra"]
    human = runner.invoke(app, ["status", str(root)])
    assert "timeout ×1: t0-v1" in human.output and "stage_timeout_s" in human.output

    res = runner.invoke(app, ["retry", str(root), "--kinds", "timeout", "--timeout-s", "20", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["retried"] == {"t0-v1": ["sleepy", "sleepyecho"]}  # sleepyecho failed because sleepy did
    assert run_counts(root, out["run_id"]) == {"ingest": {"cached": 1}, "sleepy": {"ok": 1}, "sleepyecho": {"ok": 1}}
    assert "sleepy.json" in shard_samples(root)["t0-v1"]
    after = json.loads(runner.invoke(app, ["status", str(root), "--json"]).output)["stages"]["sleepy"]
    assert after["failed"] == 0 and after["done"] == 4
    assert after["slowest"][0]["video_id"] == "t0-v1" and after["slowest"][0]["seconds"] >= 3  # the 3 s retry

    res = runner.invoke(app, ["retry", str(root), "--ids", "t1-v1", "--json"])  # nothing unfinished: no work
    assert json.loads(res.output)["retried"] == {}
    res = runner.invoke(app, ["retry", str(root), "--kinds", "nonsense"])
    assert res.exit_code != 0 and "unknown error kinds" in str(res.exception)


def _calls(root: Path, run_id: str, stage: str) -> list[tuple[float, float]]:
    """(start, end) of each call of a stage: the rows of one call are logged together, each with
    its share of the call's seconds."""
    rows = sorted((r for r in Ledger(str(root)).table(run_id).to_pylist() if r["stage"] == stage),
                  key=lambda r: r["finished_at"])
    calls: list[list[dict]] = []
    for r in rows:
        if calls and r["finished_at"] - calls[-1][-1]["finished_at"] < 0.02:
            calls[-1].append(r)
        else:
            calls.append([r])
    return [(c[-1]["finished_at"] - sum(r["seconds"] for r in c), c[-1]["finished_at"]) for c in calls]


def _span(root: Path, run_id: str, stage: str) -> tuple[float, float]:
    """When a stage's calls began and ended."""
    calls = _calls(root, run_id, stage)
    return min(start for start, _ in calls), calls[-1][1]


def test_independent_stages_run_side_by_side_and_dependents_wait(corpus: Path, tmp_path: Path) -> None:
    """With `stages_at_once: 2` a stage that needs nothing from the others (sleepy) runs beside mel
    and melstats, melstats still starts after mel, and the shards are the same as one at a time."""
    stages = ["meta", "mel", "melstats", "sleepy"]
    slow = {"stage_config": {"sleepy": {"every_s": 0.4}}, "decode_chunk": 64}
    samples = {}
    for at_once in (1, 2):
        root = tmp_path / f"at-once-{at_once}"
        counts = build(root, corpus, "r", stages=stages, stages_at_once=at_once, **slow)
        assert all(c == Counter(ok=4) for s, c in counts.items() if s != "ingest"), counts
        mel, melstats, sleepy = (_span(root, "r", s) for s in ("mel", "melstats", "sleepy"))
        assert melstats[0] >= mel[1] - 0.05
        overlap = min(sleepy[1], melstats[1]) - max(sleepy[0], mel[0])
        assert (overlap > 0) == (at_once == 2), (at_once, mel, melstats, sleepy)
        samples[at_once] = {k: {m: v for m, v in sample.items() if not m.startswith("__")}
                            for k, sample in shard_samples(root).items()}
    assert samples[1] == samples[2]


def test_the_next_chunk_starts_while_this_one_finishes(corpus: Path, tmp_path: Path) -> None:
    """Two chunks of two videos: `sleepy` on the second chunk runs while `sleepyecho`, which needs
    `sleepy`, finishes the first; each stage still takes the chunks in order and every row is kept."""
    root = tmp_path / "pipelined"
    counts = build(root, corpus, "r", stages=["meta", "sleepy", "sleepyecho"], decode_chunk=2,
                   stage_config={"sleepy": {"every_s": 0.4}, "sleepyecho": {"every_s": 0.4}})
    assert counts["sleepy"] == counts["sleepyecho"] == Counter(ok=4), counts
    sleepy, echo = _calls(root, "r", "sleepy"), _calls(root, "r", "sleepyecho")
    assert len(sleepy) == len(echo) == 2, (sleepy, echo)
    assert echo[0][0] >= sleepy[0][1] - 0.05 and echo[1][0] >= sleepy[1][1] - 0.05  # needs its input
    assert sleepy[1][0] < echo[0][1] - 0.2, (sleepy, echo)  # chunk 2 did not wait for chunk 1 to finish
    assert len(shard_samples(root)) == 4
