"""Test-only stages for tests/test_ops*.py, in a module of their own so that a stage's worker
process (flows/isolation.py) imports them quickly (no typer, no CLI, no torch)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from extractors.base import Extractor, Members, Resources, StageConfig, Video, json_bytes, npy_bytes, register
from usv.errors import UsvError

STAGES_MODULE = __name__


class MelStatsConfig(StageConfig):
    scale: float = 1.0


@register
class MelStats(Extractor[MelStatsConfig]):
    """Test-only stage that reads `mel`'s output, to show that a changed upstream re-runs it."""

    name = "melstats"
    Config = MelStatsConfig
    requires = ("mel",)

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        out: list[Members | UsvError] = []
        for v in videos:
            mel = np.load(io.BytesIO(v.upstream["mel"]["mel.npy"])).astype(np.float32)
            out.append({"melstats.npy": npy_bytes(mel.mean(axis=1) * self.config.scale)})
        return out


class SleepyConfig(StageConfig):
    slow_id: str = ""
    sleep_s: float = 30.0
    hog_id: str = ""
    every_s: float = 0.0  # a pause on every video, to give crash tests time to strike


@register
class Sleepy(Extractor[SleepyConfig]):
    """Test-only stage: hangs on one video and allocates 8 GiB on another."""

    name = "sleepy"
    Config = SleepyConfig
    batch_size = 2

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        out: list[Members | UsvError] = []
        for v in videos:
            time.sleep(self.config.every_s)
            if v.video_id == self.config.slow_id:
                time.sleep(self.config.sleep_s)
            if v.video_id == self.config.hog_id:
                np.ones(1 << 30)  # 8 GiB of float64
            out.append({"sleepy.json": json_bytes({"video_id": v.video_id})})
        return out


class SleepyEchoConfig(StageConfig):
    every_s: float = 0.0


@register
class SleepyEcho(Extractor[SleepyEchoConfig]):
    """Test-only stage that reads `sleepy`, so a timed-out `sleepy` fails it as `upstream`."""

    name = "sleepyecho"
    Config = SleepyEchoConfig
    requires = ("sleepy",)

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        time.sleep(self.config.every_s * len(videos))
        return [{"sleepyecho.json": v.upstream["sleepy"]["sleepy.json"]} for v in videos]


@register
class GpuSleep(Extractor[StageConfig]):
    """Test-only stage that declares a GPU (it runs on CPU) and records when it held it."""

    name = "gpusleep"
    resources = Resources(cpus=1, gpus=1)
    batch_size = 64

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        start = time.time()
        time.sleep(1.5)
        span = {"start": start, "end": time.time(), "pid": os.getpid()}
        return [{"gpu.json": json_bytes(span)} for _ in videos]


def _drain_prefect_clients() -> None:
    """Send this process's queued logs and events while their server is still up: otherwise
    Prefect's exit hook retries them against a stopped server and pytest never exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=30)


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port with its state in `home`: the environment for
    clients (one server start per test module instead of one ephemeral server per build)."""
    from usv import prefect_env

    port = prefect_env.free_port()
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    proc = prefect_env.server_up(port)
    try:
        yield {**os.environ, **prefect_env.server_env(port), "PYTHONPATH": str(Path(__file__).parent)}
    finally:
        _drain_prefect_clients()
        prefect_env.server_down()
        if proc:
            proc.wait(timeout=30)
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old
