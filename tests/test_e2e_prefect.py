"""End to end through a real Prefect server, a real process worker and the `build-usv/local`
deployment of deploy/prefect.yaml, as a user runs it: synthetic videos + Big Buck Bunny + broken
inputs → shards and tables; a re-run does no stage work and gives byte-identical shards; two
new videos are the only work of the next run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from test_ops_stages import prefect_server

from storage.ledger import Ledger
from usv.synth import COLUMNS, add_broken_inputs, make_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["meta", "mel", "frames"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The server of `prefect_server`, the deployments of deploy/prefect.yaml and a process worker."""
    home = tmp_path_factory.mktemp("prefect")
    with prefect_server(home) as server_env:
        env = {**server_env, "USV_HOME": str(REPO)}
        subprocess.run([str(BIN / "usv"), "deploy", "--port", env["PREFECT_SERVER_API_PORT"]], env=env, check=True,
                       cwd=REPO, capture_output=True, timeout=180)
        with open(home / "worker.log", "wb") as log:
            worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "usv-local", "--limit", "1"],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield env
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def _run_deployment(env: dict[str, str], manifest: Path, out: Path) -> None:
    params = {"manifest": str(manifest), "output": str(out), "stages": STAGES, "batch_size": 4}
    res = subprocess.run([str(BIN / "prefect"), "deployment", "run", "build-usv/local", "--params", json.dumps(params),
                          "--watch", "--watch-timeout", "600"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=700)
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest) as fh:
        return [{**r, "source": str((manifest.parent / r["source"]).resolve())} for r in csv.DictReader(fh)]


def _shard_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "shards").rglob("*")) if p.is_file()}


def _samples(out: Path) -> dict[str, dict[str, object]]:
    urls = sorted(str(p) for p in (out / "shards").rglob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def _run_counts(out: Path) -> dict[tuple[str, str], set[str]]:
    run_id = json.loads((out / "state" / "build.json").read_text())["run_id"]
    table = Ledger(str(out)).table(run_id)
    counts: dict[tuple[str, str], set[str]] = {}
    for vid, stage, status in zip(*(table[c].to_pylist() for c in ("video_id", "stage", "status")), strict=True):
        counts.setdefault((stage, status), set()).add(vid)
    return counts


def test_build_deployment_end_to_end(server: dict[str, str], tmp_path: Path, bigbuckbunny: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", topics=3, per_topic=2, seconds=4.0, seed=3)
    rows = _rows(corpus)
    broken = add_broken_inputs(tmp_path / "corpus")
    rows += [{**r, "source": str((tmp_path / "corpus" / r["source"]).resolve())} for r in broken]
    rows.append({"video_id": "big.buck/bunny", "source": str(bigbuckbunny), "title": "Big Buck Bunny",
                 "topic": "animation", "macro_topic": "", "split": "test", "creator": "", "language": "en"})
    manifest, out = tmp_path / "manifest.csv", tmp_path / "out"
    _write_manifest(manifest, rows)

    _run_deployment(server, manifest, out)

    samples = _samples(out)
    latest = Ledger(str(out)).latest()
    errors = {(v, s): k for v, s, st, k in zip(*(latest[c].to_pylist() for c in
              ("video_id", "stage", "status", "error_kind")), strict=True) if st == "error"}
    failed_ingest = {v for (v, s) in errors if s == "ingest"}
    from storage.ids import sanitize_id

    ids = {sanitize_id(r["video_id"]) for r in rows}
    assert set(samples) | failed_ingest == ids and not set(samples) & failed_ingest
    assert {errors[(sanitize_id(r["video_id"]), "ingest")] for r in broken if "missing" in r["source"]} == {"fetch"}
    no_audio = [v for (v, s), k in errors.items() if s == "mel" and k == "no_audio"]
    assert len(no_audio) == 1 and no_audio[0] in samples and "mel.npy" not in samples[no_audio[0]]

    bunny = samples[sanitize_id("big.buck/bunny")]
    meta = json.loads(bunny["meta.json"])
    assert meta["split"] == "test" and meta["width"] == 1280 and meta["raw_id"] == "big.buck/bunny"
    for key, sample in samples.items():
        if "mel.npy" not in sample:
            continue
        mel = np.load(io.BytesIO(sample["mel.npy"]))
        duration = json.loads(sample["meta.json"])["duration"]
        assert mel.dtype == np.float16 and mel.shape[0] == 80, key
        assert abs(mel.shape[1] - duration * 16000 / 256) < 8, (key, mel.shape, duration)
        assert json.loads(sample["frames.json"])["times"][:2] == [0.0, 1.0]

    videos = pq.read_table(out / "tables" / "videos.parquet").to_pylist()
    assert {v["video_id"] for v in videos} == ids
    assert all(v["shard"] for v in videos if v["video_id"] in samples)
    sizes = {s: json.loads((out / "shards" / s / "sizes.json").read_text()) for s in ("train", "val", "test")}
    assert sum(sum(v.values()) for v in sizes.values()) == len(samples)

    # the same build again: nothing but cache hits, and the same bytes
    before = _shard_digests(out)
    _run_deployment(server, manifest, out)
    counts = _run_counts(out)
    assert not any(status == "ok" for (stage, status) in counts if stage in STAGES)
    assert counts[("meta", "cached")] == set(samples)
    assert _shard_digests(out) == before

    # two new videos: only they are processed
    extra = _rows(make_corpus(tmp_path / "extra", topics=2, per_topic=1, seconds=3.0, seed=9))
    extra = [{**r, "video_id": f"new-{r['video_id']}"} for r in extra]
    _write_manifest(manifest, rows + extra)
    _run_deployment(server, manifest, out)
    counts = _run_counts(out)
    new_ids = {r["video_id"] for r in extra}
    for stage in STAGES:
        assert counts[(stage, "ok")] == new_ids, stage
    assert set(_samples(out)) == set(samples) | new_ids
