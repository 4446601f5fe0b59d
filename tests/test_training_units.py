"""Fast checks of the training pieces: sampling, metrics, configs and the shard loader."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from extractors.base import json_bytes, npy_bytes
from storage.atomic import write_json
from training.config import AudioConfig, AugmentConfig, DataConfig, TextConfig, TopicConfig, VisualConfig, load_yaml
from training.data import ShardSet, eval_batches, mel_crops, train_stream, tsn_indices
from training.inputs import Inputs, missing_reason
from training.metrics import classification, fuse, ranks, retrieval, subset_plan
from usv.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_tsn_training_frames_fall_one_per_segment_and_test_frames_are_centres() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = tsn_indices(40, 8, rng)
        assert [i // 5 for i in idx] == list(range(8))
    assert list(tsn_indices(24, 24, None)) == list(range(24))
    assert list(tsn_indices(3, 6, None)) == [0, 0, 1, 1, 2, 2]  # short videos repeat frames


def test_mel_crops_random_in_training_uniform_at_test_and_padded() -> None:
    mel = np.arange(80 * 300, dtype=np.float32).reshape(80, 300)
    test = mel_crops(mel, 128, 10, None)
    assert test.shape == (10, 1, 80, 128)
    assert test[0, 0, 0, 0] == 0 and test[-1, 0, 0, -1] == 299
    train = mel_crops(mel, 128, 1, np.random.default_rng(1))
    assert train.shape == (1, 1, 80, 128)
    short = mel_crops(mel[:, :50], 128, 2, None)
    assert short.shape == (2, 1, 80, 128) and short[0, 0, 0, 60] == mel[:, :50].min()


def test_mca_weighs_classes_equally() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    scores = np.eye(2)[[0] * 10]  # always class 0
    m = classification(labels, scores)
    assert m["top1"] == pytest.approx(80.0) and m["mca"] == pytest.approx(50.0)


def test_fusion_uses_weights_and_every_combination() -> None:
    s = {"visual": np.array([[0.6, 0.4]]), "audio": np.array([[0.0, 1.0]]), "text": np.array([[1.0, 0.0]])}
    fused = fuse(s, {"visual": 1.0, "audio": 0.5, "text": 0.5})
    assert set(fused) == {"visual", "audio", "text", "visual+audio", "visual+text", "audio+text", "visual+audio+text"}
    assert np.allclose(fused["visual+audio"], [[0.6 / 3, 0.9 / 3]])


def test_ranks_count_ties_against_the_match() -> None:
    assert list(ranks(np.eye(3))) == [1, 1, 1]
    assert list(ranks(np.ones((3, 3)))) == [3, 3, 3]  # identical embeddings score as chance, not perfect


def test_retrieval_subsets_scale_down_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="usv.training"):
        plan = subset_plan(50, 20, 1000, seed=0)
    assert len(plan) == 1 and len(plan[0]) == 50 and "cannot fill" in caplog.text
    plan = subset_plan(100, 4, 20, seed=0)
    assert len(plan) == 4 and len(set(np.concatenate(plan))) == 80  # disjoint
    emb = np.eye(20)
    m = retrieval(emb, emb, [np.arange(20)])
    assert m["video_to_title"]["R@1"] == 100.0 and m["title_to_video"]["MedR"] == 1.0


def test_config_yaml_with_dotted_overrides_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("data: {shards: /x, batch_size: 4}\naudio: {width: 8}\n")
    cfg = load_yaml(TopicConfig, path, {"audio.optim.epochs": 3, "run.seed": 7, "run.name": None})
    assert (cfg.data.shards, cfg.data.batch_size, cfg.audio.width, cfg.audio.optim.epochs, cfg.run.seed) == (
        "/x", 4, 8, 3, 7)
    assert cfg.fusion_weights == {"visual": 1.0, "audio": 0.5, "text": 0.5}
    with pytest.raises(ConfigError, match="audio"):
        load_yaml(TopicConfig, None, {"audio.widht": 8})


def _write_shards(root: Path, shards: int, per_shard: int, members: tuple[str, ...] = ("mel",)) -> ShardSet:
    sizes = {}
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / "shards" / "train" / name)) as sink:
            for i in range(per_shard):
                key = f"v{s}-{i}"
                sample = {"__key__": key, "meta.json": json_bytes({"topic": f"t{i % 2}"})}
                if "mel" in members:
                    sample["mel.npy"] = npy_bytes(np.full((80, 140), s * 100 + i, np.float16))
                sink.write(sample)
        sizes[name] = per_shard
    write_json(str(root / "shards" / "train" / "sizes.json"), sizes)
    write_json(str(root / "shards" / "index.json"), {"splits": {"train": {"samples": shards * per_shard}},
                                                     "stages": {"meta": "x", **{m: "x" for m in members}}})
    return ShardSet.open(str(root))


def _audio_inputs() -> Inputs:
    return Inputs(["audio"], visual=VisualConfig(), audio=AudioConfig(), text=TextConfig(), augment=AugmentConfig(),
                  classes=["t0", "t1"])


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_reads_every_sample_once(tmp_path: Path, workers: int) -> None:
    (tmp_path / "shards" / "train").mkdir(parents=True)
    shards = _write_shards(tmp_path, shards=4, per_shard=5)
    split = shards.split("train")
    assert split.samples == 20 and len(split.urls) == 4
    cfg = DataConfig(shards=str(tmp_path), batch_size=3, num_workers=workers)
    batches, steps = train_stream(split, _audio_inputs().transform(train=True), cfg, seed=0, epoch=0)
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == sorted(f"v{s}-{i}" for s in range(4) for i in range(5))
    assert steps == 7
    first = next(iter(eval_batches(split, _audio_inputs().transform(train=False), 4)))
    assert first["audio"].shape == (4, 10, 1, 80, 128) and first["label"].tolist() == [0, 1, 0, 1]


def test_distributed_streams_take_equal_batch_counts(tmp_path: Path) -> None:
    (tmp_path / "shards" / "train").mkdir(parents=True)
    shards = _write_shards(tmp_path, shards=1, per_shard=9)  # fewer shards than ranks: resampled
    cfg = DataConfig(shards=str(tmp_path), batch_size=2)
    counts = []
    for rank in (0, 1):
        batches, steps = train_stream(shards.split("train"), _audio_inputs().transform(True), cfg, seed=0,
                                      epoch=0, rank=rank, world=2)
        counts.append((len(list(batches)), steps))
    assert counts == [(3, 3), (3, 3)]


def test_missing_member_gives_a_message_that_says_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "shards" / "train").mkdir(parents=True)
    shards = _write_shards(tmp_path, shards=1, per_shard=2)
    assert missing_reason(shards, "audio") is None
    reason = missing_reason(shards, "visual")
    assert reason is not None and "clip.npy" in reason and "--stages" in reason
    with pytest.raises(ConfigError, match="usv build"):
        ShardSet.open(str(tmp_path / "nowhere"))


def test_prefect_flows_are_named_for_deployment() -> None:
    from flows.train import train_retrieval_flow, train_topic_flow

    assert (train_topic_flow.name, train_retrieval_flow.name) == ("train-topic", "train-retrieval")


def test_example_configs_load() -> None:
    from training.config import RetrievalConfig

    repo = Path(__file__).resolve().parent.parent
    assert load_yaml(TopicConfig, repo / "deploy" / "train-topic.yaml").fusion_weights["visual"] == 1.0
    assert load_yaml(RetrievalConfig, repo / "deploy" / "train-retrieval.yaml").temperature == 0.05


def test_shards_stream_from_an_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    (tmp_path / "shards" / "train").mkdir(parents=True)
    _write_shards(tmp_path, shards=2, per_shard=3)
    fs = fsspec.filesystem("memory")
    for path in (tmp_path / "shards").rglob("*"):
        if path.is_file():
            fs.pipe(f"/usvtest/{path.relative_to(tmp_path)}", path.read_bytes())
    shards = ShardSet.open("memory://usvtest")
    split = shards.split("train")
    assert split.urls[0].startswith("memory://")
    keys = [k for b in eval_batches(split, _audio_inputs().transform(train=False), 4) for k in b["__key__"]]
    assert sorted(keys) == sorted(f"v{s}-{i}" for s in range(2) for i in range(3))
