"""`mel`: log-Mel spectrogram of the whole track (the paper's audio branch input).

Defaults from DESIGN.md: 16 kHz, 80 filters, 32 ms window, 16 ms hop, FFT size 1280, so a
2 s clip is 80×128 frames after cropping. Stored as float16 `mel.npy` of shape (80, T).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from extractors.base import Extractor, Members, StageConfig, Video, npy_bytes, register
from usv.errors import ErrorKind, UsvError


class MelConfig(StageConfig):
    n_mels: int = 80
    win_ms: float = 32.0
    hop_ms: float = 16.0
    n_fft: int = 1280
    floor: float = Field(1e-6, description="added before the log, so silence is finite")


@register
class MelStage(Extractor[MelConfig]):
    name = "mel"
    version = "1"
    Config = MelConfig
    needs = frozenset({"audio"})
    batch_size = 32

    def _transform(self, rate: int) -> Any:
        import torchaudio

        c = self.config
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=rate, n_fft=c.n_fft, win_length=int(rate * c.win_ms / 1000),
            hop_length=int(rate * c.hop_ms / 1000), n_mels=c.n_mels, power=2.0,
        )

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        import torch  # here, not at import: a build's preflight need not wait for torch

        out: list[Members | UsvError] = []
        for v in videos:
            if v.audio is None or v.audio.size == 0:
                out.append(UsvError(ErrorKind.NO_AUDIO, "the video has no audio track"))
                continue
            with torch.no_grad():
                mel = self._transform(v.audio_rate)(torch.from_numpy(np.asarray(v.audio, dtype=np.float32)))
                logmel = torch.log(mel + self.config.floor)
            out.append({"mel.npy": npy_bytes(logmel.numpy().astype(np.float16))})
        return out
