"""Prefect flows `build-usv` and `rebuild-shards`.

A task is a *batch* of videos (decision 4) and returns a small report; Prefect's own result
caching is off (`NO_CACHE`) because the feature store's keys decide what is done (decision 1).
The task runner is a setting: threads, processes, Dask or Ray, all existing engines.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows.pipeline import BatchReport, load_stages, process_batch, summarize, warm_up
from storage.atomic import join, read_json, write_json
from storage.feature_store import FeatureStore
from storage.lock import RootLock
from storage.manifest import ManifestRow, load_manifest
from storage.pack import Packer, PackReport
from usv.config import BuildConfig
from usv.errors import ConfigError
from usv.progress import track


def resolve_config(config_file: str | None = None, **overrides: Any) -> BuildConfig:
    """A YAML file (optional) with non-None keyword overrides on top; local paths made absolute."""
    cfg = BuildConfig.from_yaml(config_file, **overrides) if config_file else BuildConfig.model_validate(
        {k: v for k, v in overrides.items() if v is not None})
    updates = {}
    for name in ("manifest", "output"):
        value = getattr(cfg, name)
        if value and "://" not in value:
            updates[name] = str(Path(value).expanduser().resolve())
    return cfg.model_copy(update=updates)


def make_task_runner(cfg: BuildConfig) -> TaskRunner[Any]:
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.task_runner_address:
            return DaskTaskRunner(address=cfg.task_runner_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True})
    if cfg.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ConfigError("task_runner 'ray' needs `pip install prefect-ray`") from exc
        return RayTaskRunner(address=cfg.task_runner_address) if cfg.task_runner_address else RayTaskRunner()
    raise ConfigError(f"unknown task_runner {cfg.task_runner!r}: use threads, processes, dask or ray")


@task(name="process-batch", cache_policy=NO_CACHE)
def process_batch_task(rows: list[ManifestRow], cfg: BuildConfig, run_id: str) -> BatchReport:
    return process_batch(rows, cfg, run_id)


@flow(name="extract-batches")
def extract_batches(batches: list[list[ManifestRow]], cfg: BuildConfig, run_id: str) -> list[BatchReport]:
    """Runs the batches on the configured task runner, publishing progress as it goes."""
    progress = create_progress_artifact(0.0, key="build-progress", description="batches done (%)")
    futures = [process_batch_task.submit(b, cfg, run_id) for b in batches]
    reports = []
    for i, fut in enumerate(track(futures, "batches"), start=1):
        reports.append(fut.result())
        update_progress_artifact(progress, 100.0 * i / len(futures))
    return reports


def pack_shards(cfg: BuildConfig, manifest_url: str) -> PackReport:
    manifest = load_manifest(manifest_url)
    return Packer(cfg.output, load_stages(cfg), cfg.pack).pack(manifest)


def _publish(summary: dict[str, Any]) -> None:
    from usv.ops import status_summary, status_table
    from usv.report import summarize, summary_markdown

    create_table_artifact(status_table(status_summary(summary["output"])), key="build-ledger",
                          description="per stage: this build's ok/cached/errors, and what is done, failed, pending")
    splits = ", ".join(f"{s}: {n}" for s, n in summary["samples"].items())
    create_markdown_artifact(
        f"# build {summary['run_id']}\n\n- output: `{summary['output']}`\n- videos in manifest: {summary['videos']}\n"
        f"- samples in shards: {summary['total_samples']} ({splits})\n- without a sample: {len(summary['missing'])}\n"
        f"- seconds: {summary['seconds']:.1f}\n\n{summary_markdown(summarize(summary['output']))}", key="build-summary")


def _warm_up_early(cfg: BuildConfig, videos: int) -> threading.Thread | None:
    """With in-process batches (threads), start loading the models of stages that lack features for
    some videos while Prefect starts the batches; a build with nothing to do loads nothing."""
    if cfg.task_runner != "threads":
        return None
    store = FeatureStore(cfg.output)
    stages = [s for s in load_stages(cfg) if len(store.present(s.name, s.fingerprint())) < videos]
    if not stages:
        return None
    thread = threading.Thread(target=warm_up, args=(cfg, stages), name="usv-warm-up", daemon=True)
    thread.start()
    return thread


@flow(name="build-usv", log_prints=True)
def build_usv(
    manifest: str = "",
    output: str = "data/out",
    stages: list[str] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    task_runner: str | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Manifest → features → shards. Only missing work runs; everything is recorded."""
    cfg = resolve_config(config_file, manifest=manifest or None, output=output, stages=stages,
                         batch_size=batch_size, workers=workers, task_runner=task_runner)
    if not cfg.manifest:
        raise ConfigError("no manifest given: pass manifest=… or set it in the config file")
    log = get_run_logger()
    t0 = time.time()
    for stage in load_stages(cfg):  # preflight: missing weights or bad settings stop the run here
        stage.fingerprint()
    with RootLock(cfg.output):
        loaded = load_manifest(cfg.manifest)
        for dup in loaded.duplicates:
            log.warning("duplicate video_id %s at row %d ignored (first row wins)", dup.video_id, dup.row)
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        write_json(join(cfg.output, "state", "build.json"), {"run_id": run_id, "config": cfg.model_dump(mode="json")})
        rows = loaded.rows
        warmer = _warm_up_early(cfg, len(rows))
        batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        log.info("%d videos in %d batches of ≤%d, stages %s", len(rows), len(batches), cfg.batch_size, cfg.stages)
        reports = extract_batches.with_options(task_runner=make_task_runner(cfg))(batches, cfg, run_id)
        if warmer is not None:
            warmer.join()
        packed = pack_shards(cfg, cfg.manifest)
    summary = {
        "run_id": run_id, "output": cfg.output, "videos": len(rows),
        "duplicates": [d.video_id for d in loaded.duplicates],
        "counts": summarize(reports), "samples": packed.samples, "total_samples": packed.total,
        "missing": packed.missing, "shards": packed.shards, "seconds": time.time() - t0,
    }
    _publish(summary)
    log.info("packed %d samples %s into %s", packed.total, packed.samples, join(cfg.output, "shards"))
    return summary


@flow(name="rebuild-shards", log_prints=True)
def rebuild_shards(
    output: str = "data/out",
    manifest: str | None = None,
    stages: list[str] | None = None,
    split_ratios: dict[str, float] | None = None,
    seed: int | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Re-pack shards from the feature store, extracting nothing.

    Without a config file it reuses the settings of the last build on `output`; `stages`
    chooses a subset of the stored stages to pack, `split_ratios`/`seed` a new split scheme.
    """
    root = output if "://" in output or not output else str(Path(output).resolve())
    if config_file:
        cfg = resolve_config(config_file, output=root)
    else:
        try:
            cfg = BuildConfig.model_validate(read_json(join(root, "state", "build.json"))["config"])
        except FileNotFoundError as exc:
            raise ConfigError(f"{root} has no previous build; pass config_file=…") from exc
    pack = cfg.pack.model_copy(update={k: v for k, v in
                                       {"stages": stages, "split_ratios": split_ratios, "seed": seed}.items()
                                       if v is not None})
    cfg = cfg.model_copy(update={"pack": type(cfg.pack).model_validate(pack.model_dump()),
                                 "manifest": manifest or cfg.manifest, "output": root})
    with RootLock(cfg.output):
        packed = pack_shards(cfg, cfg.manifest)
    get_run_logger().info("packed %d samples %s", packed.total, packed.samples)
    return {"output": cfg.output, **asdict(packed), "total_samples": packed.total}

