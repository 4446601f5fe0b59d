"""CLIP frame embeddings through the real loading path: a randomly initialised open_clip model
saved as a checkpoint file and loaded by `pretrained=<path>` must give the in-memory model's
embeddings; missing weights stop the run naming the setting; outputs are deterministic and
batching across videos does not change them."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from extractors.base import Video, make_stage
from extractors.media import decode_frames, probe
from flows.pipeline import BatchRunner, load_stages, process_batch
from storage.feature_store import FeatureStore
from storage.manifest import load_manifest
from usv.config import BuildConfig
from usv.errors import ConfigError

MODEL = "ViT-B-32"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                  reason="needs ffmpeg and espeak-ng")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised model saved the way users save open_clip weights (a state_dict)."""
    torch.manual_seed(1234)
    model = open_clip.create_model(MODEL, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "random-vitb32.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def videos(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Video]:
    scratch = tmp_path_factory.mktemp("frames")
    out = []
    for row in load_manifest(str(small_corpus)).rows[:3]:
        meta = probe(row.source)
        frames, times = decode_frames(row.source, meta, 1.0, (meta.width, meta.height), scratch / f"{row.video_id}.rgb")
        out.append(Video(row, row.video_id, meta, frames, times))
    return out


def test_missing_weights_name_the_setting(tmp_path: Path) -> None:
    stage = make_stage("clip", {"pretrained": "openai", "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"stage_config\.clip\.pretrained: /path/to/checkpoint\.pt") as info:
        stage.weights_id()
    assert "stage_config.clip.random_weights: true" in str(info.value)
    with pytest.raises(ConfigError, match="not a file"):
        make_stage("clip", {"pretrained": str(tmp_path / "missing.pt")}).weights_id()
    cfg = BuildConfig(output=str(tmp_path / "out"), stages=["meta", "clip"],
                      stage_config={"clip": {"pretrained": "openai", "cache_dir": str(tmp_path)}})
    with pytest.raises(ConfigError):  # the run stops before any work
        BatchRunner(cfg, "test")


@pytest.mark.slow
@needs_ffmpeg
def test_checkpoint_file_round_trip(checkpoint: tuple[Path, torch.nn.Module], videos: list[Video]) -> None:
    path, model = checkpoint
    stage = make_stage("clip", {"model": MODEL, "pretrained": str(path), "device": "cpu", "precision": "float32"})
    stage.ensure_setup()
    frames = list(videos[0].frames)
    got = stage.embed(frames)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.inference_mode():
        ref = model.encode_image(torch.stack([preprocess(Image.fromarray(np.asarray(f))) for f in frames]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert got.shape == (len(frames), 512)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert stage.weights_id() == make_stage("clip", {"pretrained": str(path)}).weights_id() != ""
    assert stage.provenance()["random_weights"] is False
    fast = make_stage("clip", {"model": MODEL, "pretrained": str(path), "device": "cpu", "precision": "bfloat16"})
    fast.ensure_setup()  # bfloat16 (AMX) stays within float tolerance of float32, and is keyed apart
    cosine = (fast.embed(frames) * got).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert fast.fingerprint() != stage.fingerprint()


@pytest.mark.slow
@needs_ffmpeg
def test_batching_across_videos_changes_nothing(checkpoint: tuple[Path, torch.nn.Module],
                                                videos: list[Video]) -> None:
    stage = make_stage("clip", {"pretrained": str(checkpoint[0]), "batch_frames": 5, "device": "cpu"})
    stage.ensure_setup()
    together = stage.process(videos)
    alone = [stage.process([v])[0] for v in videos]
    for v, a, b in zip(videos, together, alone, strict=True):
        assert isinstance(a, dict) and isinstance(b, dict)
        x, y = np.load(io.BytesIO(a["clip.npy"])), np.load(io.BytesIO(b["clip.npy"]))
        assert x.dtype == np.float16 and x.shape == (len(v.frames), 512)
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3)
        assert a["clip.json"] == b["clip.json"]
        assert json.loads(a["clip.json"])["times"] == [float(t) for t in v.frame_times]


@pytest.mark.slow
@needs_ffmpeg
def test_pipeline_random_weights_are_marked_and_deterministic(small_corpus: Path, tmp_path: Path) -> None:
    rows = load_manifest(str(small_corpus)).rows[:2]
    outputs = []
    for run in ("a", "b"):
        cfg = BuildConfig(output=str(tmp_path / run), stages=["meta", "clip"],
                          stage_config={"clip": {"random_weights": True, "seed": 7}})
        assert process_batch(rows, cfg, run).counts["clip"] == {"ok": len(rows)}
        stage = load_stages(cfg, ["clip"])[0]
        assert stage.weights_id() == "random-7" and stage.provenance()["random_weights"] is True
        fp = stage.fingerprint()
        store = FeatureStore(str(tmp_path / run))
        found = {}
        for path in sorted((tmp_path / run / "features" / "clip" / fp).glob("*.parquet")):
            vid, key = path.stem.rsplit("-", 1)
            found[vid] = store.read("clip", fp, vid, key)
        outputs.append(found)
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(rows)
    for members in outputs[0].values():
        meta = json.loads(members["clip.json"])
        assert meta["random_weights"] is True and meta["model"] == MODEL and meta["pretrained"] == "random-7"
        emb = np.load(io.BytesIO(members["clip.npy"])).astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
