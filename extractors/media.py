"""Probe and decode with the real ffmpeg: frames at a fixed rate, 16 kHz mono audio.

Frames are streamed out of ffmpeg one at a time into a memory-mapped scratch file, already
scaled to a working size, so a 4K or hour-long video costs disk, not RAM. ffmpeg's default
autorotation applies the rotation in the stream's display matrix, and its `fps` filter turns
variable frame rate into frames at fixed times `n / fps` (`round=up` picks the frame shown at
that time; the default `near` would take one up to half an interval later).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usv.errors import ErrorKind, UsvError

DECODE_VERSION = "2"  # bump when decoded frames or audio change for the same settings
IMAGE_CODECS = {"mjpeg", "png", "bmp", "gif", "webp", "tiff", "jpeg2000"}


def require_ffmpeg() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found on PATH: install it with `apt-get install ffmpeg`")


@dataclass(frozen=True)
class Probe:
    duration: float
    fps: float
    width: int  # as displayed, after rotation
    height: int
    rotation: int
    video_codec: str
    audio_codec: str
    has_audio: bool
    audio_rate: int
    container: str

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _rate(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    num, _, den = text.partition("/")
    return float(num) / float(den or 1) if float(den or 1) else 0.0


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return round(float(side["rotation"])) % 360
    return int(float(stream.get("tags", {}).get("rotate", 0))) % 360


def probe(path: str, timeout_s: float = 60.0) -> Probe:
    """ffprobe metadata; raises UsvError(not_a_video) for anything without a video stream."""
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", path]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UsvError(ErrorKind.TIMEOUT, f"ffprobe took longer than {timeout_s}s") from exc
    if out.returncode != 0:
        msg = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["unreadable"]
        raise UsvError(ErrorKind.NOT_A_VIDEO, f"ffprobe cannot read it: {msg[0]}")
    info = json.loads(out.stdout or b"{}")
    streams = info.get("streams", [])
    video = next((s for s in streams
                  if s.get("codec_type") == "video" and s.get("codec_name") not in IMAGE_CODECS), None)
    if video is None:
        raise UsvError(ErrorKind.NOT_A_VIDEO, "no video stream (an image, audio-only or other file)")
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = info.get("format", {})
    duration = float(fmt.get("duration") or video.get("duration") or 0.0)
    if duration <= 0:
        raise UsvError(ErrorKind.NOT_A_VIDEO, "video stream has no duration")
    rotation = _rotation(video)
    w, h = int(video.get("width", 0)), int(video.get("height", 0))
    if rotation in (90, 270):
        w, h = h, w
    return Probe(
        duration=duration,
        fps=_rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate")),
        width=w,
        height=h,
        rotation=rotation,
        video_codec=str(video.get("codec_name", "")),
        audio_codec=str(audio.get("codec_name", "")) if audio else "",
        has_audio=audio is not None,
        audio_rate=int(audio.get("sample_rate", 0)) if audio else 0,
        container=str(fmt.get("format_name", "")),
    )


def working_size(width: int, height: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Scale down (never up) to fit both limits, keeping the aspect ratio, even sizes."""
    scale = min(1.0, short_side / max(1, min(width, height)), max_long_side / max(1, max(width, height)))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_frames(
    path: str, meta: Probe, fps: float, size: tuple[int, int], scratch: Path,
    max_seconds: float | None = None, timeout_s: float = 900.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, H, W, 3) uint8 as a read-only memmap, and their times in seconds."""
    w, h = size
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "2", "-i", path]
    if max_seconds:
        cmd += ["-t", str(max_seconds)]
    cmd += ["-an", "-vf", f"fps={fps}:round=up,scale={w}:{h}:flags=area",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    frame_bytes = w * h * 3
    scratch.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        with open(scratch, "wb") as fh:
            while chunk := proc.stdout.read(frame_bytes):
                if len(chunk) < frame_bytes:
                    break
                fh.write(chunk)
                n += 1
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise UsvError(ErrorKind.TIMEOUT, f"frame decode took longer than {timeout_s}s") from exc
    if proc.returncode != 0 and n == 0:
        raise UsvError(ErrorKind.DECODE, f"ffmpeg could not decode frames: {err.decode(errors='replace')[-300:]}")
    if n == 0:
        raise UsvError(ErrorKind.DECODE, "no frames decoded")
    frames = np.memmap(scratch, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
    return frames, np.arange(n, dtype=np.float64) / fps


def decode_audio(path: str, rate: int = 16000, max_seconds: float | None = None,
                 timeout_s: float = 900.0) -> np.ndarray:
    """The whole track as float32 mono at `rate` Hz."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path]
    if max_seconds:
        cmd += ["-t", str(max_seconds)]
    cmd += ["-vn", "-ac", "1", "-ar", str(rate), "-f", "f32le", "pipe:"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UsvError(ErrorKind.TIMEOUT, f"audio decode took longer than {timeout_s}s") from exc
    if out.returncode != 0:
        raise UsvError(ErrorKind.DECODE, f"ffmpeg could not decode audio: {out.stderr.decode(errors='replace')[-300:]}")
    return np.frombuffer(out.stdout, dtype="<f4").copy()
