"""Scale-out: the build on a Dask cluster given by address (a LocalCluster of two worker
processes here) gives the same shards as the default thread runner, and a GPU stage holds a slot
of the `usv-gpu` Prefect global concurrency limit, so with a limit of 1 two workers never run it at
once; without the limit on the server the build still runs."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from test_ops_stages import GpuSleep, prefect_server

from flows.isolation import GPU_LIMIT, gpu_slot
from usv.synth import make_corpus

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
STAGES = ["meta", "mel", "frames", "gpusleep"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server(tmp_path_factory.mktemp("prefect")) as env, \
            temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield env["PREFECT_API_URL"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("dask-corpus"), topics=2, per_topic=2, seconds=3)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dask-out")


def _samples(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar in sorted((root / "shards").glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            assert s["__key__"] not in out
            out[s["__key__"]] = s
    return out


def _spans(root: Path) -> list[dict[str, float]]:
    """One (start, end, pid) per gpusleep call (the videos of a batch share one)."""
    spans = {json.loads(s["gpu.json"])["start"]: json.loads(s["gpu.json"]) for s in _samples(root).values()}
    return sorted(spans.values(), key=lambda s: s["start"])


def test_gpu_slot_is_a_no_op_outside_a_prefect_run() -> None:
    with gpu_slot(GpuSleep(GpuSleep.Config())):  # no run context: no server is asked
        pass


def test_threads_without_a_gpu_limit_on_the_server(api: str, manifest: Path, roots: Path) -> None:
    from flows.build import build_usv

    summary = build_usv(manifest=str(manifest), output=str(roots / "threads"), stages=STAGES, batch_size=2)
    assert summary["counts"]["gpusleep"] == {"ok": 4} and summary["total_samples"] == 4


def test_dask_cluster_by_address_with_a_gpu_limit(api: str, manifest: Path, roots: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.build import build_usv

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(TESTS)  # the worker processes import the test-only stages
    try:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               preload=["test_ops_stages"])
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    with cluster, Client(cluster) as dask:
        config = tmp_path / "dask.yaml"
        config.write_text(yaml.safe_dump({"task_runner": "dask", "task_runner_address": cluster.scheduler_address}))
        summary = build_usv(manifest=str(manifest), output=str(roots / "dask"), stages=STAGES, batch_size=2,
                            config_file=str(config))
        worker_pids = set(dask.run(os.getpid).values())
        loaded = dask.run(lambda: sorted(__import__("flows.pipeline").pipeline._STAGES))
    assert summary["counts"]["mel"] == {"ok": 4} and summary["total_samples"] == 4
    assert any(loaded.values()), "no batch ran on a Dask worker"
    spans = _spans(roots / "dask")
    assert len(spans) == 2 and {s["pid"] for s in spans} <= worker_pids and os.getpid() not in worker_pids
    assert spans[0]["end"] <= spans[1]["start"], f"two GPU stages ran at once despite the limit: {spans}"

    ref, got = _samples(roots / "threads"), _samples(roots / "dask")
    assert set(ref) == set(got)
    for key in ref:
        for member in ("meta.json", "mel.npy", "frames.json", "frame0000.jpg"):
            assert got[key][member] == ref[key][member], (key, member)
    import numpy as np

    assert np.load(io.BytesIO(got[next(iter(got))]["mel.npy"])).shape[0] == 80
