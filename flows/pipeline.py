"""The work of one batch, free of Prefect: ingest → plan → decode once → stages → store.

For each video the planner computes every stage's cache key and keeps only the stages whose
output is missing (decision 1). Videos with work are decoded in small chunks, once, with only
the inputs their pending stages need (decision 5); the next chunk decodes on its own thread
while the stages run. Each stage then runs on the whole chunk as one batch, beside other
stages of this chunk or the next (`BatchRunner.run_chunks`).
Every outcome becomes a ledger row (decision 3); a failing video never stops the batch.
"""

from __future__ import annotations

import contextvars
import json
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from extractors.base import Extractor, Members, Video, make_stage, order_stages
from extractors.media import decode_audio, decode_frames, working_size
from flows.isolation import SETUP_TIMEOUT_S, gpu_slot, limit_for, run_isolated, worker_for
from storage.atomic import is_local
from storage.cache_keys import stage_keys
from storage.feature_store import FeatureStore
from storage.ingest import Ingested, Ingestor
from storage.ledger import Ledger, LedgerRow
from storage.manifest import ManifestRow
from usv.config import BuildConfig
from usv.errors import ErrorKind, UsvError

log = logging.getLogger(__name__)

INGEST = "ingest"
# Upstream failures that say the content lacks an input, not that a stage broke: a stage that
# lists the upstream in `optional_requires` runs without it (a transient failure still blocks,
# so the downstream output is never cached without an input it would later have had).
ABSENT_INPUT = frozenset({ErrorKind.NO_AUDIO})

_STAGES: dict[str, Extractor[Any]] = {}
_STAGES_LOCK = threading.Lock()
_RUN_LOCKS: dict[int, threading.Lock] = {}
_CHUNKS_OPEN = 2  # chunks decoded (or decoding) and not yet done: bounds the frames held in memory


def load_stages(cfg: BuildConfig, names: Sequence[str] | None = None) -> list[Extractor[Any]]:
    """Stage objects in dependency order, one per process and settings (models load once)."""
    out = []
    with _STAGES_LOCK:
        for name in order_stages(names or cfg.stages):
            settings = cfg.stage_config.get(name, {})
            decode = cfg.decode.signature()
            ident = f"{name}:{json.dumps([settings, decode], sort_keys=True)}"
            if ident not in _STAGES:
                _STAGES[ident] = make_stage(name, settings, decode)
                _RUN_LOCKS[id(_STAGES[ident])] = threading.Lock()
            out.append(_STAGES[ident])
    return out


def media_cache(cfg: BuildConfig) -> Path:
    if is_local(cfg.output):
        return Path(cfg.output) / "cache" / "media"
    return Path.home() / ".cache" / "usv" / "media"


@dataclass
class _Item:
    row: ManifestRow
    ingested: Ingested
    keys: dict[str, str]
    pending: list[str]
    produced: dict[str, Members] = field(default_factory=dict)
    failed: dict[str, UsvError] = field(default_factory=dict)
    video: Video | None = None
    decode_errors: dict[str, UsvError] = field(default_factory=dict)


@dataclass
class _Open:
    """A decoded chunk whose stages are still running: the stages not yet started, those running."""

    items: list[_Item]
    waiting: list[Extractor[Any]]
    running: set[str] = field(default_factory=set)


@dataclass
class BatchReport:
    """The small manifest a task returns (decision 4): counts, never arrays."""

    videos: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, stage: str, outcome: str) -> None:
        self.counts.setdefault(stage, {})
        self.counts[stage][outcome] = self.counts[stage].get(outcome, 0) + 1


def _error_of(exc: BaseException) -> UsvError:
    if isinstance(exc, UsvError):
        return exc
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return UsvError(ErrorKind.OOM, f"{type(exc).__name__}: {exc}")
    return UsvError(ErrorKind.MODEL, f"{type(exc).__name__}: {exc}")


class BatchRunner:
    def __init__(self, cfg: BuildConfig, run_id: str) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.store = FeatureStore(cfg.output)
        self.ledger = Ledger(cfg.output)
        self.stages = load_stages(cfg)
        self.fingerprints = {s.name: s.fingerprint() for s in self.stages}
        self.rows: list[LedgerRow] = []
        self.report = BatchReport()
        self._attempts: dict[tuple[str, str, str], int] | None = None
        self._log_lock = threading.Lock()

    # -- ledger -------------------------------------------------------------------------
    def _attempt(self, video_id: str, stage: str, key: str) -> int:
        if self._attempts is None:  # read the ledger only when something failed
            self._attempts = self.ledger.error_attempts()
        return self._attempts.get((video_id, stage, key), 0) + 1

    def _log(self, video_id: str, stage: str, key: str, status: str, seconds: float = 0.0,
             error: UsvError | None = None) -> None:
        with self._log_lock:  # stages log from their own threads
            attempt = self._attempt(video_id, stage, key) if error else 1
            self.rows.append(LedgerRow(
                self.run_id, video_id, stage, key, status,
                error.kind.value if error else "", error.message if error else "", attempt, seconds,
            ))
            self.report.add(stage, f"error:{error.kind.value}" if error else status)

    def _flush(self) -> None:
        with self._log_lock:  # stages of the next chunk may be logging meanwhile
            rows, self.rows = self.rows, []
        self.ledger.append(rows)

    # -- plan -----------------------------------------------------------------------------
    def plan(self, rows: Sequence[ManifestRow]) -> list[_Item]:
        for s in self.stages:
            self.store.record_stage(s.name, self.fingerprints[s.name], s.provenance())
        present = {s.name: self.store.present(s.name, self.fingerprints[s.name]) for s in self.stages}
        ingestor = Ingestor(self.cfg.output, media_cache(self.cfg), self.cfg.ingest)
        items = []
        for row in rows:
            t0 = time.perf_counter()
            try:
                ingested = ingestor.identify(row)
            except UsvError as err:
                self._log(row.video_id, INGEST, "", "error", time.perf_counter() - t0, err)
                continue
            self._log(row.video_id, INGEST, ingested.content_hash, "cached" if ingested.reused else "ok",
                      time.perf_counter() - t0)
            keys = stage_keys(self.stages, ingested.content_hash, row)
            pending = []
            for s in self.stages:
                if f"{row.video_id}-{keys[s.name]}.parquet" in present[s.name]:
                    self._log(row.video_id, s.name, keys[s.name], "cached")
                else:
                    pending.append(s.name)
            if pending:
                items.append(_Item(row, ingested, keys, pending))
        self._ingestor = ingestor
        return items

    # -- decode ---------------------------------------------------------------------------
    def _needs(self, item: _Item) -> set[str]:
        by_name = {s.name: s for s in self.stages}
        return {need for name in item.pending for need in by_name[name].needs}

    def decode(self, chunk: list[_Item], scratch: Path) -> list[_Item]:
        d = self.cfg.decode
        for item in chunk:
            needs = self._needs(item)
            meta = item.ingested.probe
            video = Video(item.row, item.ingested.content_hash, meta, audio_rate=d.audio_rate)
            try:
                path = self._ingestor.localize(item.ingested)
            except UsvError as err:
                item.decode_errors = {"frames": err, "audio": err}
                item.video = video
                continue
            if "frames" in needs:
                size = working_size(meta.width, meta.height, d.short_side, d.max_long_side)
                try:
                    video.frames, video.frame_times = decode_frames(
                        path, meta, d.fps, size, scratch / f"{item.row.video_id}.rgb", d.max_seconds, d.timeout_s)
                except UsvError as err:
                    item.decode_errors["frames"] = err
            if "audio" in needs:
                if not meta.has_audio:
                    item.decode_errors["audio"] = UsvError(ErrorKind.NO_AUDIO, "the video has no audio track")
                else:
                    try:
                        video.audio = decode_audio(path, d.audio_rate, d.max_seconds, d.timeout_s)
                    except UsvError as err:
                        item.decode_errors["audio"] = err
            item.video = video
        return chunk

    # -- run ------------------------------------------------------------------------------
    def _ready(self, item: _Item, stage: Extractor[Any]) -> UsvError | None:
        """Why `item` cannot feed `stage`, or None (its own missing input first: `no_audio` says more
        than "upstream failed" when the upstream failed for the same reason)."""
        for need in stage.needs:
            if need in item.decode_errors:
                return item.decode_errors[need]
        for dep in stage.requires:
            if dep in item.failed and not (dep in stage.optional_requires and item.failed[dep].kind in ABSENT_INPUT):
                return UsvError(ErrorKind.UPSTREAM, f"needs '{dep}', which failed: {item.failed[dep].kind.value}")
        return None

    def _upstream(self, item: _Item, stage: Extractor[Any]) -> dict[str, Members]:
        out = {}
        for dep in stage.requires:
            if dep in item.failed:  # only an absent optional input gets here (see `_ready`)
                continue
            if dep not in item.produced:
                item.produced[dep] = self.store.read(dep, self.fingerprints[dep], item.row.video_id, item.keys[dep])
            out[dep] = item.produced[dep]
        return out

    def _call(self, stage: Extractor[Any], videos: list[Video]) -> list[Members | UsvError]:
        """Run a batch in-process, or in the stage's own worker process when it has a deadline or a
        memory limit (flows/isolation.py); a GPU stage first takes a slot of the `usv-gpu` limit."""
        with _RUN_LOCKS[id(stage)], gpu_slot(stage):
            if isolated(self.cfg, stage):
                memory = limit_for(self.cfg.stage_memory_gb, stage.name)
                timeout = limit_for(self.cfg.stage_timeout_s, stage.name)
                # only what the stage reads crosses the pipe (frames for OCR, not the audio track)
                videos = [replace(v, frames=v.frames if "frames" in stage.needs else None,
                                  audio=v.audio if "audio" in stage.needs else None) for v in videos]
                return run_isolated(worker_for(stage, memory), videos, timeout or SETUP_TIMEOUT_S)
            stage.ensure_setup()
            return call_isolating(stage, videos)

    def run_chunks(self, chunks: list[list[_Item]], decode: Callable[[list[_Item]], list[_Item]],
                   close: Callable[[list[_Item]], None]) -> None:
        """Every stage on every chunk. A stage runs after the stages it requires (same chunk) and
        after its own call on the previous chunk; up to `stages_at_once` such calls run together
        (their models are native code that leaves the GIL), across two chunks at a time, so a
        chunk's slow stage does not leave a core idle while the next chunk waits. The next chunk
        decodes on its own thread meanwhile. A stage whose model another batch (or the warm-up)
        is using is put off while another call can run. Finished chunks are closed in order."""
        opened: list[_Open] = []
        calls: dict[Future[None], tuple[_Open, Extractor[Any]]] = {}
        decoding: Future[list[_Item]] | None = None
        todo = list(chunks)
        with ThreadPoolExecutor(1, thread_name_prefix="usv-decode") as decoder, \
                ThreadPoolExecutor(self.cfg.stages_at_once, thread_name_prefix="usv-stage") as pool:
            while todo or opened or decoding:
                if todo and decoding is None and len(opened) < _CHUNKS_OPEN:
                    decoding = decoder.submit(decode, todo.pop(0))
                    continue
                call = self._next_call(opened) if len(calls) < self.cfg.stages_at_once else None
                if call is not None:
                    chunk, stage = call
                    chunk.waiting.remove(stage)
                    chunk.running.add(stage.name)
                    # the Prefect run context (GPU limit, logging) lives in contextvars: carry it over
                    calls[pool.submit(contextvars.copy_context().run, self._run_stage, stage, chunk.items)] = call
                    continue
                busy: list[Future[Any]] = [*calls, *([decoding] if decoding else [])]
                if not busy:
                    raise RuntimeError(f"no stage can run: {[[s.name for s in c.waiting] for c in opened]}")
                done, _ = wait(busy, return_when=FIRST_COMPLETED)
                if decoding in done:
                    opened.append(_Open(decoding.result(), list(self.stages)))
                    decoding = None
                for future in done.intersection(calls):
                    chunk, stage = calls.pop(future)
                    chunk.running.discard(stage.name)
                    future.result()
                while opened and not opened[0].waiting and not opened[0].running:
                    close(opened.pop(0).items)

    @staticmethod
    def _next_call(opened: list[_Open]) -> tuple[_Open, Extractor[Any]] | None:
        """The earliest chunk's first ready stage, preferring one whose model is free."""
        ready: list[tuple[_Open, Extractor[Any]]] = []
        earlier: set[str] = set()  # stages still to run (or running) on an earlier chunk
        for chunk in opened:
            names = {s.name for s in chunk.waiting} | chunk.running
            ready += [(chunk, s) for s in chunk.waiting
                      if s.name not in earlier and not names.intersection(s.requires)]
            earlier |= names
        return next((c for c in ready if not _RUN_LOCKS[id(c[1])].locked()), ready[0] if ready else None)

    def _run_stage(self, stage: Extractor[Any], chunk: list[_Item]) -> None:
        todo: list[_Item] = []
        for item in chunk:
            if stage.name not in item.pending:
                continue
            why = self._ready(item, stage)
            if why is not None:
                item.failed[stage.name] = why
                self._log(item.row.video_id, stage.name, item.keys[stage.name], "error", error=why)
                continue
            todo.append(item)
        for start in range(0, len(todo), stage.batch_size):
            part = todo[start:start + stage.batch_size]
            # each stage gets its own view of the video: stages running at once see their own upstream
            videos = [replace(i.video, upstream=self._upstream(i, stage)) for i in part if i.video is not None]
            t0 = time.perf_counter()
            results = self._call(stage, videos)
            each = (time.perf_counter() - t0) / max(1, len(part))
            for item, result in zip(part, results, strict=True):
                vid, key = item.row.video_id, item.keys[stage.name]
                if isinstance(result, UsvError):
                    item.failed[stage.name] = result
                    self._log(vid, stage.name, key, "error", each, result)
                    continue
                self.store.write(stage.name, self.fingerprints[stage.name], vid, key,
                                 item.ingested.content_hash, result)
                item.produced[stage.name] = result
                self._log(vid, stage.name, key, "ok", each)

    def run(self, rows: Sequence[ManifestRow]) -> BatchReport:
        t0 = time.perf_counter()
        self.report.videos = len(rows)
        items = self.plan(rows)
        self._flush()
        chunks = [items[i:i + self.cfg.decode_chunk] for i in range(0, len(items), self.cfg.decode_chunk)]
        with tempfile.TemporaryDirectory(prefix="usv-decode-") as tmp, \
                ThreadPoolExecutor(1, thread_name_prefix="usv-warm-up") as warm:
            pending = {name for item in items for name in item.pending}
            warm.submit(warm_up, self.cfg, [s for s in self.stages if s.name in pending])

            def close(chunk: list[_Item]) -> None:
                self._flush()
                for item in chunk:  # drop arrays, memmaps and downloads
                    item.video = None
                    (Path(tmp) / f"{item.row.video_id}.rgb").unlink(missing_ok=True)
                    self._ingestor.forget_media(item.ingested)

            self.run_chunks(chunks, lambda c: self.decode(c, Path(tmp)), close)
        self.report.seconds = time.perf_counter() - t0
        return self.report


def isolated(cfg: BuildConfig, stage: Extractor[Any]) -> bool:
    """Whether the stage runs in its own worker process (`own_process`, a deadline or a memory limit)."""
    return bool(stage.name in cfg.own_process or limit_for(cfg.stage_timeout_s, stage.name)
                or limit_for(cfg.stage_memory_gb, stage.name))


def warm_up(cfg: BuildConfig, stages: Sequence[Extractor[Any]]) -> None:
    """Load the stages' models in order, ahead of their first batch; run on a side thread, so imports
    and weight loading (≈10 s for the default stages) overlap Prefect's start, decoding and the first
    stages. A stage that fails to load is left alone: its first batch raises the error again, per video."""
    for stage in stages:
        if isolated(cfg, stage):  # its worker process loads the models, beside this thread
            worker_for(stage, limit_for(cfg.stage_memory_gb, stage.name)).spawn()
            continue
        with _RUN_LOCKS[id(stage)]:
            try:
                stage.ensure_setup()
            except Exception:  # recorded when the stage runs
                log.debug("warm-up of %s failed; its batches will report it", stage.name, exc_info=True)


def call_isolating(stage: Extractor[Any], videos: Sequence[Video]) -> list[Members | UsvError]:
    """Run a batch; if the batch call itself fails, isolate the culprit video by video."""
    try:
        results = stage.process(videos)
        if len(results) != len(videos):
            raise RuntimeError(f"stage {stage.name} returned {len(results)} results for {len(videos)} videos")
        return results
    except Exception as exc:  # noqa: BLE001 - every failure becomes a ledger row
        if len(videos) == 1:
            return [_error_of(exc)]
    out: list[Members | UsvError] = []
    for v in videos:
        try:
            out.extend(stage.process([v]))
        except Exception as exc:  # noqa: BLE001
            out.append(_error_of(exc))
    return out


def process_batch(rows: Sequence[ManifestRow], cfg: BuildConfig, run_id: str) -> BatchReport:
    return BatchRunner(cfg, run_id).run(rows)


def summarize(reports: Sequence[BatchReport]) -> dict[str, dict[str, int]]:
    total: dict[str, Counter[str]] = {}
    for r in reports:
        for stage, counts in r.counts.items():
            total.setdefault(stage, Counter()).update(counts)
    return {s: dict(c) for s, c in total.items()}

