"""Crash safety with real processes: `usv build` is SIGKILLed during extraction, inside a
feature-store write (temp file written, not yet renamed), while packing, and at random moments.
After each kill no file under a final name is partial; the next run takes over the stale lock,
sweeps the temp files, redoes nothing that was finished (ledger: cached = what was on disk) and
packs every video exactly once. A second build on a root that is in use is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from test_ops_stages import prefect_server

from storage.lock import LOCK_NAME
from usv.synth import make_corpus

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
STAGES = ["meta", "mel", "frames", "sleepy"]
VIDEOS = 6

# Runs `usv build` in this process after arming one SIGKILL: USV_CRASH_AT=<point>:<n> kills the
# process at the n-th stage call (extract), feature write (store: after the temp file is complete,
# before its rename) or tar sample (pack: mid-shard); USV_CRASH_AT=hang: hangs instead of packing.
DRIVER = r'''
import os, signal, sys, uuid
from pathlib import Path
import test_ops_stages  # noqa: F401  (the `sleepy` stage)

point, _, n = os.environ.get("USV_CRASH_AT", "none:0").partition(":")
calls = {"n": 0}

def strike():
    calls["n"] += 1
    if calls["n"] >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)

if point == "extract":
    import extractors.mel as mel
    real = mel.MelStage.process
    def process(self, videos):
        strike()
        return real(self, videos)
    mel.MelStage.process = process
elif point == "store":
    import storage.feature_store as fstore
    real_write = fstore.write_bytes
    def write_bytes(url, data):
        if calls["n"] + 1 >= int(n):
            target = Path(url)
            (target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}").write_bytes(data)
        strike()
        real_write(url, data)
    fstore.write_bytes = write_bytes
elif point == "hang":  # hold the lock: extract, then hang instead of packing
    import time
    import storage.pack
    storage.pack.Packer.pack = lambda self, manifest: time.sleep(600)
elif point == "pack":
    import webdataset as wds
    real_tw = wds.TarWriter.write
    def tw_write(self, obj):
        size = real_tw(self, obj)
        strike()
        return size
    wds.TarWriter.write = tw_write

from usv.cli import main
sys.argv = ["usv", *sys.argv[1:]]
main()
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server for the builds (one start instead of one per build)."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as server_env:
        yield server_env


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Corpus, driver script and a config with small chunks and shards (many kill points)."""
    base = tmp_path_factory.mktemp("crash")
    manifest = make_corpus(base / "corpus", topics=3, per_topic=2, seconds=3)
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump({
        "stages": STAGES, "batch_size": 64, "decode_chunk": 2,
        "stage_config": {"sleepy": {"every_s": 0.4}},
        "pack": {"shard_max_count": 2, "split_ratios": {"train": 0.5, "val": 0.5}},
    }))
    return manifest, driver, config


def _build(env: dict[str, str], setup: tuple[Path, Path, Path], root: Path, crash: str | None = None,
           wait: bool = True) -> subprocess.Popen[str]:
    manifest, driver, config = setup
    proc = subprocess.Popen(
        [sys.executable, str(driver), "build", str(manifest), "--output", str(root), "--config", str(config)],
        env={**env, "USV_CRASH_AT": crash or "none:0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.wait(timeout=180)
    return proc


def _final_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-") and p.name != LOCK_NAME]


def _check_nothing_partial(root: Path) -> None:
    """Every file under a final name is whole: Parquet, tar and JSON all parse completely."""
    for p in _final_files(root):
        if p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".tar":
            list(wds.WebDataset(str(p), shardshuffle=False, empty_check=False))
        elif p.suffix == ".json":
            json.loads(p.read_text())


def _features_on_disk(root: Path) -> Counter[str]:
    return Counter(p.parent.parent.name for p in (root / "features").glob("*/*/*.parquet")
                   if not p.name.startswith(".tmp-"))


def _latest_run_counts(root: Path) -> dict[str, Counter[str]]:
    run = json.loads((root / "state" / "build.json").read_text())["run_id"]
    out: dict[str, Counter[str]] = {}
    for part in (root / "ledger" / run).glob("*.parquet"):
        for r in pq.read_table(part).to_pylist():
            out.setdefault(r["stage"], Counter())[r["status"]] += 1
    return out


def _resume_and_check(env: dict[str, str], setup: tuple[Path, Path, Path], root: Path) -> None:
    """Re-run after a kill: stale lock taken over, nothing redone, every video packed once."""
    _check_nothing_partial(root)
    on_disk = _features_on_disk(root)
    proc = _build(env, setup, root)
    assert proc.returncode == 0, proc.stdout.read()[-4000:]  # type: ignore[union-attr]
    counts = _latest_run_counts(root)
    for stage in STAGES:
        assert counts[stage]["cached"] == on_disk[stage], (stage, counts, on_disk)
        assert counts[stage]["ok"] == VIDEOS - on_disk[stage], (stage, counts, on_disk)
    keys = Counter(s["__key__"] for tar in sorted((root / "shards").glob("*/*.tar"))
                   for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
    assert len(keys) == VIDEOS and set(keys.values()) == {1}, keys
    sizes = sum(sum(json.loads(p.read_text()).values()) for p in (root / "shards").glob("*/sizes.json"))
    assert sizes == VIDEOS
    assert not [p for p in root.rglob(".tmp-*")], "temp files left behind"
    assert not (root / LOCK_NAME).exists()
    _check_nothing_partial(root)


def _killed(proc: subprocess.Popen[str]) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout.read()[-3000:])  # type: ignore[union-attr]


def _rng() -> random.Random:
    seed = int(os.environ.get("USV_CRASH_SEED", time.time()))
    print(f"USV_CRASH_SEED={seed}")  # re-run the same kill points with this
    return random.Random(seed)


def test_kill_in_each_phase_then_resume(env: dict[str, str], setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Random points inside each phase: the n-th mel batch (of 3 chunks), the n-th of the feature
    writes still to do (4 stages × 6 videos in all), the n-th packed sample (of 6)."""
    root, rng = tmp_path / "out", _rng()
    for phase, most in (("extract", lambda: 3), ("store", lambda: 24 - sum(_features_on_disk(root).values())),
                        ("pack", lambda: VIDEOS)):
        crash = f"{phase}:{rng.randint(1, most())}"
        _killed(_build(env, setup, root, crash))
        if crash.startswith("store"):
            assert list((root / "features").rglob(".tmp-*")), "the store kill should leave a temp file"
        if crash.startswith("pack"):
            assert list((root / "shards").rglob(".tmp-*")), "the pack kill should leave a half tar"
        _check_nothing_partial(root)
        assert (root / LOCK_NAME).exists()  # the dead holder's lock stays behind
    _resume_and_check(env, setup, root)


def test_kill_at_a_random_moment_and_a_second_build_is_refused(env: dict[str, str], setup: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    root = tmp_path / "out"
    proc = _build(env, setup, root, wait=False)
    time.sleep(_rng().uniform(3.0, 9.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _check_nothing_partial(root)

    holder = _build(env, setup, root, "hang", wait=False)
    deadline = time.time() + 60
    while not (root / LOCK_NAME).exists() or json.loads((root / LOCK_NAME).read_text())["pid"] != holder.pid:
        assert time.time() < deadline and holder.poll() is None, "the first build never took the lock"
        time.sleep(0.2)
    second = _build(env, setup, root)
    out = second.stdout.read()  # type: ignore[union-attr]
    assert second.returncode != 0 and "in use by another build" in out, out[-3000:]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    _resume_and_check(env, setup, root)
