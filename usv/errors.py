"""Typed per-video errors: every failure is recorded against one video and one stage.

The kind drives what happens next (decision 3 in DESIGN.md): permanent kinds describe the
content and are not retried until the content changes; transient kinds are retried on the
next run.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    FETCH = "fetch"  # source missing, unreachable, too large
    NOT_A_VIDEO = "not_a_video"  # ffprobe finds no decodable video stream
    NO_AUDIO = "no_audio"  # stage needs audio, the video has none
    DECODE = "decode"  # ffmpeg failed mid-stream
    TIMEOUT = "timeout"
    OOM = "oom"
    MODEL = "model"  # model missing or failing on this input
    UPSTREAM = "upstream"  # a stage this one depends on failed
    INTERNAL = "internal"  # a bug: anything else


PERMANENT = frozenset({ErrorKind.NOT_A_VIDEO, ErrorKind.NO_AUDIO, ErrorKind.UPSTREAM})


class UsvError(Exception):
    """A failure of one video (or one input file) that the batch survives."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message


class ConfigError(ValueError):
    """Bad user input that stops the whole run before any work (manifest, settings, weights)."""
