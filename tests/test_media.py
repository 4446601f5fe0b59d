"""Probe and decode with real ffmpeg on real files: rotation, variable frame rate, no audio, junk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from extractors.base import Video, make_stage
from extractors.media import decode_audio, decode_frames, probe, working_size
from storage.manifest import ManifestRow
from usv.errors import ErrorKind, UsvError


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x180:r=25:d=3", "-f", "lavfi", "-i", "sine=f=440:d=3",
            "-c:v", "libx264", "-c:a", "aac", "-shortest", str(d / "plain.mp4"))
    _ffmpeg("-i", str(d / "plain.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(d / "rotated.mp4"))
    # variable frame rate: 2 s at 5 fps then 2 s at 30 fps, timestamps kept as they are
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x180:r=5:d=2", "-f", "lavfi", "-i", "testsrc2=s=320x180:r=30:d=2",
            "-filter_complex", "[0:v]settb=1/1000[a];[1:v]settb=1/1000[b];[a][b]concat=n=2:v=1[v]", "-map", "[v]",
            "-fps_mode", "vfr", "-c:v", "libx264", str(d / "vfr.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x180:r=25:d=2", "-c:v", "libx264", "-an", str(d / "silent.mp4"))
    (d / "notes.mp4").write_text("not a video at all")
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:d=1", "-frames:v", "1", str(d / "image.jpg"))
    return d


def test_probe_reads_geometry_audio_and_rotation(media: Path) -> None:
    plain, rotated = probe(str(media / "plain.mp4")), probe(str(media / "rotated.mp4"))
    assert (plain.width, plain.height, plain.rotation, plain.has_audio) == (320, 180, 0, True)
    assert abs(plain.duration - 3.0) < 0.1 and plain.fps == 25.0
    assert (rotated.width, rotated.height) == (180, 320) and rotated.rotation in (90, 270)
    assert probe(str(media / "silent.mp4")).has_audio is False


@pytest.mark.parametrize("name", ["notes.mp4", "image.jpg"])
def test_non_videos_are_typed_errors(media: Path, name: str) -> None:
    with pytest.raises(UsvError) as info:
        probe(str(media / name))
    assert info.value.kind is ErrorKind.NOT_A_VIDEO


def test_frames_honour_rotation_and_rate(media: Path, tmp_path: Path) -> None:
    meta = probe(str(media / "rotated.mp4"))
    size = working_size(meta.width, meta.height, 480, 1280)
    frames, times = decode_frames(str(media / "rotated.mp4"), meta, 1.0, size, tmp_path / "r.rgb")
    assert frames.shape == (3, 320, 180, 3) and frames.dtype == np.uint8
    assert isinstance(frames, np.memmap)  # long videos cost disk, not RAM
    assert times.tolist() == [0.0, 1.0, 2.0]


def test_variable_frame_rate_gives_one_frame_per_second(media: Path, tmp_path: Path) -> None:
    meta = probe(str(media / "vfr.mp4"))
    frames, times = decode_frames(str(media / "vfr.mp4"), meta, 1.0, (160, 90), tmp_path / "v.rgb")
    assert len(frames) == 4 and times[-1] == 3.0
    frames2, _ = decode_frames(str(media / "vfr.mp4"), meta, 2.0, (160, 90), tmp_path / "v2.rgb")
    assert len(frames2) == 8


def test_working_size_never_upscales_and_keeps_aspect() -> None:
    assert working_size(3840, 2160, 480, 1280) == (854, 480)
    assert working_size(320, 180, 480, 1280) == (320, 180)
    assert working_size(1080, 1920, 480, 1280) == (480, 854)


def test_audio_is_16k_mono_and_mel_has_the_papers_shape(media: Path) -> None:
    audio = decode_audio(str(media / "plain.mp4"), 16000)
    assert audio.dtype == np.float32 and abs(len(audio) - 48000) < 2048
    freqs = np.abs(np.fft.rfft(audio[:16000]))
    assert abs(int(np.argmax(freqs)) - 440) <= 2  # the sine really is 440 Hz
    row = ManifestRow(video_id="a", raw_id="a", source="x", title="", topic="t")
    video = Video(row=row, content_hash="h", probe=probe(str(media / "plain.mp4")), audio=audio[:32000])
    [out] = make_stage("mel").process([video])
    assert not isinstance(out, UsvError)
    import io

    mel = np.load(io.BytesIO(out["mel.npy"]))
    assert mel.dtype == np.float16 and mel.shape == (80, 32000 // 256 + 1)  # 2 s → 80×126 (+1 centre frame)
    [err] = make_stage("mel").process([Video(row=row, content_hash="h", probe=probe(str(media / "silent.mp4")))])
    assert isinstance(err, UsvError) and err.kind is ErrorKind.NO_AUDIO
