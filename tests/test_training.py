"""Acceptance of training on cached features, on the synthetic corpus (usv.synth).

Each modality carries only part of the topic (visual_group = t//2, audio_group = t%2, a third
partition for subtitles), so a single branch is capped and fusion must beat every branch; the
title shares a subtitle noun and a spoken noun with its video, so retrieval must beat chance by
far. Shards are built once per module with every stage that exists here (clip with random
weights: no CLIP weights exist offline); a branch whose stage is missing is reported as skipped.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from extractors.base import registry
from flows.build import pack_shards
from flows.pipeline import process_batch
from storage.manifest import load_manifest
from training.config import RetrievalConfig, TopicConfig
from training.retrieval import evaluate_retrieval, train_retrieval
from training.topic import evaluate_topic, train_topic
from usv.config import BuildConfig, PackConfig
from usv.synth import make_corpus

REPO = Path(__file__).resolve().parent.parent
WANTED = ("meta", "mel", "clip", "ocr", "text")
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                reason="needs ffmpeg and espeak-ng")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("training")
    made = make_corpus(root / "corpus", topics=6, per_topic=7, seconds=5.0, seed=0)
    rows = list(csv.DictReader(made.open()))
    for r in rows:  # a balanced split (4 train / 3 test per topic) instead of the hashed one
        r["split"] = "train" if int(r["video_id"].rsplit("-v", 1)[1]) < 4 else "test"
    manifest = made.with_name("manifest-split.csv")
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stages = [s for s in WANTED if s in registry()]
    cfg = BuildConfig(manifest=str(manifest), output=str(root / "out"), stages=stages,
                      stage_config={"clip": {"random_weights": True}} if "clip" in stages else {},
                      pack=PackConfig(split_ratios={"train": 0.6, "test": 0.4}))  # unused: the manifest splits
    report = process_batch(load_manifest(str(manifest)).rows, cfg, "test-training")
    assert all(set(report.counts[s]) <= {"ok", "cached"} for s in stages), report.counts
    pack_shards(cfg, str(manifest))
    return root / "out", stages


def _topic_cfg(out: Path, runs: Path, name: str, **extra: Any) -> TopicConfig:
    return TopicConfig.model_validate({
        "data": {"shards": str(out), "batch_size": 8}, "run": {"output": str(runs), "name": name, "seed": 0},
        "visual": {"optim": {"epochs": 40, "lr": 3e-3}}, "text": {"optim": {"epochs": 40, "lr": 3e-3}},
        "audio": {"width": 8, "blocks": [1, 1, 1, 1], "optim": {"epochs": 30, "lr": 3e-3}}, **extra})


@pytest.fixture(scope="module")
def topic_run(shards: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out, _ = shards
    return train_topic(_topic_cfg(out, tmp_path_factory.mktemp("runs"), "topic"))


@pytest.mark.slow
def test_fusion_beats_every_single_branch(topic_run: dict[str, Any]) -> None:
    table = topic_run["table5"]
    print(json.dumps({k: v["mca"] for k, v in table.items()}, indent=1), "skipped:", topic_run["skipped"])
    trained = [b for b in ("visual", "audio", "text") if b in table]
    if len(trained) < 2:
        pytest.skip(f"fusion needs two branches; only {trained} could train: {topic_run['skipped']}")
    fused = table["+".join(trained)]["mca"]
    for b in trained:
        assert fused > table[b]["mca"], (b, table)
    assert topic_run["n_eval"] >= 12
    assert (Path(topic_run["run"]) / "plots" / "loss.png").is_file()
    assert (Path(topic_run["run"]) / "checkpoints" / f"{trained[0]}.safetensors").is_file()
    assert topic_run["confused_pairs"][trained[0]], "a capped branch must confuse some classes"


@pytest.mark.slow
def test_topic_checkpoints_reload_and_reproduce_metrics(topic_run: dict[str, Any]) -> None:
    stored = json.loads((Path(topic_run["run"]) / "metrics.json").read_text())
    again = evaluate_topic(topic_run["run"], write=False)
    assert again == stored


@pytest.mark.slow
def test_retrieval_far_above_chance_and_reproducible(shards: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, stages = shards
    missing = [s for s in ("clip", "text") if s not in stages]
    if missing:
        pytest.skip(f"retrieval needs the {missing} stage(s), not available here yet")
    cfg = RetrievalConfig.model_validate({
        "data": {"shards": str(out), "batch_size": 16}, "run": {"output": str(tmp_path), "name": "vtcl"},
        "ablation": [["visual"], ["visual", "text"], ["visual", "audio", "text"]],
        "audio": {"width": 8, "blocks": [1, 1, 1, 1]}, "optim": {"epochs": 30, "lr": 2e-3}, "dim": 64, "hidden": 128})
    metrics = train_retrieval(cfg)
    print(json.dumps({k: [v["video_to_title"], v["title_to_video"]] for k, v in metrics["table6"].items()}),
          json.dumps(metrics["table7_zero_shot"]))
    full = metrics["table6"]["visual+audio+text"]
    chance = full["chance_R@1"]
    assert full["video_to_title"]["R@1"] >= 3 * chance and full["title_to_video"]["R@1"] >= 3 * chance
    assert metrics["table7_zero_shot"]["visual+audio+text"]["mca"] > 100 / 6
    assert evaluate_retrieval(metrics["run"], write=False) == json.loads(
        (Path(metrics["run"]) / "metrics.json").read_text())


@pytest.mark.slow
def test_two_process_gloo_training_via_torchrun(shards: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = shards
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29617", "-m", "usv.cli", "train", "topic",
           "--shards", str(out), "--output", str(tmp_path), "--name", "ddp", "--json",
           "--set", "branches=[audio]", "--set", "audio.width=4", "--set", "audio.optim.epochs=2",
           "--set", "data.batch_size=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert len(history["loss"]["audio"]) == 2
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["table5"]["audio"]["n"] == metrics["n_eval"] > 0
    assert '"task": "topic"' in proc.stdout  # rank 0 printed the metrics once
    assert proc.stdout.count('"task": "topic"') == 1
