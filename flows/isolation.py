"""Per-video deadlines and memory limits for a stage: the stage runs in its own worker process.

Python cannot stop a thread, so a stage with `stage_timeout_s` (or `stage_memory_gb`) in the
build config runs in a child process (`python -m flows.isolation`) that imports the stage's
module, builds it with the same settings and loads its models once. Each batch is sent over a
pipe with a deadline of `timeout × videos`. When the deadline passes the child is killed and
the batch is re-run video by video in fresh children, so only the culprit is recorded as
`timeout` and the rest of the batch goes on. A child that dies on its own (the kernel's OOM
killer) or exceeds its address-space limit (set after setup, on top of what the models
mapped) records `oom`. The cost is a copy of the decoded
inputs through the pipe and a model load after each kill. Stages listed in `own_process` run
here too without a limit (their Python then holds its own GIL); the other stages run in-process.
A subprocess, not `multiprocessing`, so it also works inside daemonic Dask worker processes,
and CUDA initialises cleanly in the child.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

from extractors.base import Extractor, Members, Video
from usv.errors import ErrorKind, UsvError

SETUP_TIMEOUT_S = 1800.0  # model loading is not the stage's per-video work
GPU_LIMIT = "usv-gpu"  # Prefect global concurrency limit; create it with limit = number of GPUs
Result = Members | UsvError
log = logging.getLogger(__name__)
_WORKERS: dict[int, StageWorker] = {}
# Children ask to be SIGKILLed when their parent dies (PR_SET_PDEATHSIG, in `_serve`), and Linux
# counts the *thread* that started them as the parent: stage threads come and go with each chunk,
# so workers are started from this one thread, which lives as long as the process.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="usv-stage-spawner")
_WORKERS_LOCK = threading.Lock()


def limit_for(limits: dict[str, float], stage: str) -> float | None:
    """A stage's own limit, else the '*' default, else None."""
    value = limits.get(stage, limits.get("*"))
    return float(value) if value else None


def _encode(results: Sequence[Result]) -> list[Any]:
    return [("error", r.kind.value, r.message) if isinstance(r, UsvError) else r for r in results]


def _decode(results: list[Any]) -> list[Result]:
    return [UsvError(ErrorKind(r[1]), r[2]) if isinstance(r, tuple) else r for r in results]


class StageWorker:
    """One stage in one child process; `call` returns results, or a UsvError for the whole batch."""

    def __init__(self, stage: Extractor[Any], memory_gb: float | None = None) -> None:
        self.stage = stage
        self.memory_gb = memory_gb
        self._proc: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._lock = threading.Lock()
        self._ready = False

    def spawn(self) -> None:
        """Start the child and have it load the stage's models, without waiting for it (warm-up).
        A worker busy with a batch is left alone: it is running."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._proc is not None and self._proc.poll() is not None:  # died between batches: a new one
                self.stop()
            if self._proc is None:
                self._spawn()
        finally:
            self._lock.release()

    def _spawn(self) -> None:
        self._proc = _SPAWNER.submit(  # killpg reaches its children
            subprocess.Popen, [sys.executable, "-m", "flows.isolation"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, start_new_session=True).result()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._send = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._send.send({"path": sys.path, "module": type(self.stage).__module__, "cls": type(self.stage).__qualname__,
                         "settings": json.loads(self.stage.config.model_dump_json()), "decode": self.stage.decode,
                         "memory_gb": self.memory_gb})
        self._ready = False

    def _await_ready(self) -> None:
        if self._ready:
            return
        reply = self._wait(SETUP_TIMEOUT_S)
        self._ready = isinstance(reply, tuple) and reply[0] == "ready"
        if not self._ready:
            self.stop()
            detail = reply.message if isinstance(reply, UsvError) else reply
            raise RuntimeError(f"stage {self.stage.name!r} could not start in its worker process: {detail}")

    def _wait(self, timeout_s: float) -> Any:
        """The child's next message, or a UsvError saying why none came."""
        assert self._recv is not None and self._proc is not None
        try:
            if self._recv.poll(timeout_s):
                return self._recv.recv()
        except (EOFError, OSError):
            pass
        if self._proc.poll() is None:  # still running: the deadline passed
            self.stop()
            return UsvError(ErrorKind.TIMEOUT, f"stage '{self.stage.name}' did not finish within {timeout_s:.0f} s "
                                               "(stage_timeout_s); it was stopped and this video skipped")
        code = self._proc.returncode
        self.stop()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return UsvError(ErrorKind.OOM, f"the worker process of stage '{self.stage.name}' {how}, most likely out of "
                                       "memory (raise stage_memory_gb or give the machine more memory)")

    def call(self, videos: Sequence[Video], timeout_s: float) -> list[Result] | UsvError:
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:  # died between batches: a new one
                self.stop()
            if self._proc is None:
                self._spawn()
            self._await_ready()
            assert self._send is not None
            try:
                self._send.send(list(videos))
            except (BrokenPipeError, OSError):
                return self._wait(0)
            reply = self._wait(timeout_s)
            return reply if isinstance(reply, UsvError) else _decode(reply)

    def stop(self) -> None:
        if self._proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # the worker and anything it started (ffmpeg …)
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._proc = self._send = self._recv = None


def run_isolated(worker: StageWorker, videos: Sequence[Video], per_video_s: float) -> list[Result]:
    """The batch under one deadline; if it is broken off, each video alone, so only culprits fail."""
    first = worker.call(videos, per_video_s * len(videos))
    if not isinstance(first, UsvError):
        return first
    if len(videos) == 1:
        return [first]
    out: list[Result] = []
    for video in videos:
        one = worker.call([video], per_video_s)
        out.extend([one] if isinstance(one, UsvError) else one)
    return out


def worker_for(stage: Extractor[Any], memory_gb: float | None) -> StageWorker:
    """The worker process of a stage object, one per process (started on its first batch)."""
    with _WORKERS_LOCK:
        if id(stage) not in _WORKERS:
            _WORKERS[id(stage)] = StageWorker(stage, memory_gb)
        return _WORKERS[id(stage)]


@atexit.register
def _stop_workers() -> None:
    for worker in _WORKERS.values():
        worker.stop()


@contextmanager
def gpu_slot(stage: Extractor[Any]) -> Iterator[None]:
    """Hold `ceil(gpus)` slots of the `usv-gpu` global concurrency limit while a GPU stage runs.

    Only inside a Prefect run (a library call has no server to ask). Without the limit on the
    server Prefect warns and lets the call through; an unreachable server is logged, not fatal.
    """
    gpus = stage.resources.gpus
    with ExitStack() as stack:
        if gpus > 0:
            from prefect.concurrency.sync import concurrency
            from prefect.context import FlowRunContext, TaskRunContext

            if TaskRunContext.get() or FlowRunContext.get():
                try:
                    stack.enter_context(concurrency(GPU_LIMIT, occupy=max(1, math.ceil(gpus)), strict=False))
                except Exception as exc:  # noqa: BLE001 - a missing limit must not stop a build
                    log.warning("GPU concurrency limit %r unavailable (%s); running without it", GPU_LIMIT, exc)
        yield


def _serve() -> None:
    """Child side: build the stage, then answer batches until the pipe closes."""
    import importlib
    import resource

    try:  # Linux: die with the parent, even when it is SIGKILLed while this stage hangs
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # anything the stage prints goes to stderr, never into the protocol
    init = recv.recv()
    sys.path[:0] = [p for p in init["path"] if p not in sys.path]
    from flows.pipeline import call_isolating

    try:
        cls = getattr(importlib.import_module(init["module"]), init["cls"])
        stage = cls(cls.Config.model_validate(init["settings"]), init["decode"])  # no other stage's imports
        stage.ensure_setup()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the build
        send.send(UsvError(ErrorKind.MODEL, f"{type(exc).__name__}: {exc}").message)
        return
    if init["memory_gb"]:  # on top of what imports and models already mapped (torch maps GBs of address space)
        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + int(init["memory_gb"] * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    send.send(("ready",))
    while True:
        try:
            videos = recv.recv()
        except EOFError:
            return
        send.send(_encode(call_isolating(stage, videos)))


if __name__ == "__main__":
    _serve()
