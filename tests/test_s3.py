"""S3 for real, on loopback: moto's S3 server holds the manifest, the videos and the output root.
The build reads sources and writes features, ledger, shards and tables through fsspec/s3fs; a
re-run is all cached; the shards are read back with webdataset (fsspec streams) and by the
training reader; `usv status` works on the s3:// root."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds

from flows.pipeline import load_stages, process_batch
from storage.atomic import exists, filesystem, join, write_json
from storage.ledger import Ledger
from storage.lock import LockedError, RootLock
from storage.manifest import load_manifest
from storage.pack import Packer
from usv.config import BuildConfig
from usv.ops import status_summary
from usv.synth import make_corpus

BUCKET = "usv-test"
STAGES = ["meta", "mel", "frames"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with the synthetic corpus uploaded; yields the bucket URL."""
    from moto.server import ThreadedMotoServer

    from usv.prefect_env import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}  # the last one for child processes (fsspec reads it at import)
    old_env = {k: os.environ.get(k) for k in env}
    old_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        local = make_corpus(tmp_path_factory.mktemp("s3-corpus"), topics=2, per_topic=2, seconds=3)
        fs.put(str(local.parent / "videos"), f"{BUCKET}/corpus/videos", recursive=True)
        fs.put_file(str(local), f"{BUCKET}/corpus/manifest.csv")  # relative sources: resolved against s3://
        yield f"s3://{BUCKET}"
    finally:
        fsspec.AbstractFileSystem.clear_instance_cache()
        server.stop()
        for k, v in old_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf


def _build(cfg: BuildConfig, run_id: str) -> dict[str, dict[str, int]]:
    manifest = load_manifest(cfg.manifest)
    with RootLock(cfg.output):
        write_json(join(cfg.output, "state", "build.json"), {"run_id": run_id, "config": cfg.model_dump(mode="json")})
        report = process_batch(manifest.rows, cfg, run_id)
        Packer(cfg.output, load_stages(cfg), cfg.pack).pack(manifest)
    return report.counts


@pytest.fixture(scope="module")
def built(s3: str) -> tuple[BuildConfig, dict[str, dict[str, int]]]:
    """The first build: sources, manifest and output all on S3."""
    cfg = BuildConfig(manifest=f"{s3}/corpus/manifest.csv", output=f"{s3}/out", stages=STAGES, batch_size=64,
                      pack={"shard_max_count": 2, "split_ratios": {"train": 1.0}})
    assert load_manifest(cfg.manifest).rows[0].source.startswith(f"{s3}/corpus/videos/")
    return cfg, _build(cfg, "r1")


def test_build_on_s3_and_read_the_shards_back(built: tuple[BuildConfig, dict[str, dict[str, int]]]) -> None:
    cfg, first = built
    assert all(first[s] == {"ok": 4} for s in ["ingest", *STAGES]), first
    again = _build(cfg, "r2")
    assert all(again[s] == {"cached": 4} for s in ["ingest", *STAGES]), again

    fs, root = filesystem(cfg.output)
    sizes = json.loads(fs.cat_file(f"{root}/shards/train/sizes.json"))
    assert sizes == {"train-000000.tar": 2, "train-000001.tar": 2}
    assert not [p for p in fs.find(root) if "/.tmp-" in p]
    assert not exists(join(cfg.output, ".usv.lock"))

    urls = [join(cfg.output, "shards", "train", name) for name in sorted(sizes)]
    streams = ({"url": u, "stream": fsspec.open(u, "rb").open()} for u in urls)  # fsspec streams into webdataset
    samples = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams)))
    assert sorted(s["__key__"] for s in samples) == ["t0-v0", "t0-v1", "t1-v0", "t1-v1"]
    mel = np.load(io.BytesIO(samples[0]["mel.npy"]))
    assert mel.dtype == np.float16 and mel.shape[0] == 80

    piped = list(wds.WebDataset(f"pipe:{_cat_command(urls[0])}", shardshuffle=False))
    assert len(piped) == 2

    status = status_summary(cfg.output)
    assert status["stages"]["mel"]["done"] == 4 and status["stages"]["mel"]["pending"] == []
    assert Ledger(cfg.output).latest().num_rows == 16


def _cat_command(url: str) -> str:
    import shlex
    import sys

    code = "import fsspec,shutil,sys; shutil.copyfileobj(fsspec.open(sys.argv[1],'rb').open(), sys.stdout.buffer)"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {shlex.quote(url)}"


def test_lock_on_s3_is_advisory_but_refuses_a_live_holder(s3: str) -> None:
    root = f"{s3}/locked"
    with RootLock(root), pytest.raises(LockedError, match="in use by another build"):
        RootLock(root).acquire()
    assert not exists(join(root, ".usv.lock"))


def test_training_reader_reads_s3_shards(built: tuple[BuildConfig, dict[str, dict[str, int]]]) -> None:
    data = pytest.importorskip("training.data")
    shards = data.ShardSet.open(built[0].output)
    split = shards.split("train")
    assert split.samples == 4 and all(u.startswith("s3://") for u in split.urls)
    samples = list(data.iterate_raw(split.urls))
    assert sorted(s["__key__"] for s in samples) == ["t0-v0", "t0-v1", "t1-v0", "t1-v1"]


def test_local_paths_still_work_next_to_s3(s3: str, tmp_path: Path) -> None:
    """The fsspec configuration for S3 does not change local roots."""
    assert filesystem(str(tmp_path))[0].protocol[0] in ("file", "local")
