"""`diarize`: who spoke when, as `diar.json` {"num_speakers", "turns": [{"start","end","speaker"}]}.

Two backends. `pyannote` runs a pyannote.audio pipeline from weights the user points at (a local
folder or config.yaml, or a hub id with a token where the hub is reachable); its checkpoints are
gated, so they are never fetched implicitly. The offline default, `silero+resemblyzer`, works
with what ships as packages: silero-vad finds speech regions, Resemblyzer embeds fixed windows
(1.5 s, hop 0.75 s) inside them, agglomerative clustering on cosine distance with a distance
threshold estimates the number of speakers (clusters too small to be a voice are folded into the
nearest one), each 10 ms speech frame takes the majority label of the windows covering it, and
short flickers are absorbed before same-speaker turns are merged. Windows of every video in a
batch go through the encoder together. Resemblyzer's mel spectrogram (librosa's, with its
parameters) is computed by torchaudio instead (same values within 1e-5 relative): librosa's
numba JIT costs ≈1.7 s per process, and the suite once crashed with numba compiling beside
OpenVINO inferring in another stage thread. Speakers are named SPEAKER_00, 01 … in order of first
appearance, so the same audio always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from extractors.base import Extractor, Members, Resources, StageConfig, Video, file_digest, json_bytes, register
from extractors.weights import package_dir
from usv.errors import ConfigError, ErrorKind, UsvError

FRAME_S = 0.01  # Resemblyzer's mel hop, also the resolution of the label track


class DiarizeConfig(StageConfig):
    backend: Literal["silero+resemblyzer", "pyannote"] = "silero+resemblyzer"
    pipeline: str | None = Field(None, description="pyannote: local folder / config.yaml, or a hub id (needs a token)")
    token_env: str = Field("HF_TOKEN", description="pyannote: environment variable holding the hub token")
    max_speakers: int = Field(6, ge=1)
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_s: float = Field(0.25, ge=0)
    window_s: float = Field(1.5, gt=0.3)
    hop_s: float = Field(0.75, gt=0)
    threshold: float = Field(0.3, gt=0, lt=2, description="cosine distance at which clusters stop merging")
    min_cluster_s: float = Field(0.5, ge=0, description="clusters with less speech join the nearest one")
    min_cluster_share: float = Field(0.1, ge=0, lt=1, description="… as do clusters with less of the speech")
    min_turn_s: float = Field(0.5, ge=0, description="shorter label runs join their neighbour")
    merge_gap_s: float = Field(0.5, ge=0, description="same-speaker turns closer than this merge")
    threads: int = Field(1, ge=1)


def resemblyzer_mel() -> Any:
    """Resemblyzer's `wav_to_mel_spectrogram` (librosa defaults: Slaney mel, centred, zero padding)
    as a torchaudio transform: (samples,) → (40, frames) power mel."""
    import torchaudio
    from resemblyzer import hparams as hp

    rate = hp.sampling_rate
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=rate, n_fft=int(rate * hp.mel_window_length / 1000),
        hop_length=int(rate * hp.mel_window_step / 1000), n_mels=hp.mel_n_channels,
        norm="slaney", mel_scale="slaney", power=2.0, center=True, pad_mode="constant")


def _runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, label) of each run of equal values."""
    if labels.size == 0:
        return []
    edges = np.flatnonzero(np.diff(labels)) + 1
    starts = np.r_[0, edges]
    ends = np.r_[edges, labels.size]
    return [(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends, strict=True)]


def smooth_turns(regions: list[tuple[float, float]], frame_labels: list[np.ndarray], min_turn_s: float,
                 merge_gap_s: float) -> list[dict[str, Any]]:
    """Label runs per speech region → turns, absorbing flickers shorter than `min_turn_s`."""
    turns: list[list[Any]] = []
    min_frames = round(min_turn_s / FRAME_S)
    for (start, _), labels in zip(regions, frame_labels, strict=True):
        runs = [list(r) for r in _runs(labels)]
        while len(runs) > 1:
            i = min(range(len(runs)), key=lambda k: (runs[k][1] - runs[k][0], k))
            if runs[i][1] - runs[i][0] >= min_frames:
                break
            left = runs[i - 1] if i > 0 else None
            right = runs[i + 1] if i + 1 < len(runs) else None
            j = i - 1 if right is None or (left is not None and left[1] - left[0] >= right[1] - right[0]) else i + 1
            runs[j] = [min(runs[i][0], runs[j][0]), max(runs[i][1], runs[j][1]), runs[j][2]]
            del runs[i]
            merged = [runs[0]]  # neighbours that now share a label become one run
            for r in runs[1:]:
                if r[2] == merged[-1][2]:
                    merged[-1][1] = r[1]
                else:
                    merged.append(r)
            runs = merged
        turns.extend([start + s * FRAME_S, start + e * FRAME_S, lab] for s, e, lab in runs)
    out: list[list[Any]] = []
    for t in turns:
        if out and out[-1][2] == t[2] and t[0] - out[-1][1] <= merge_gap_s:
            out[-1][1] = t[1]
        else:
            out.append(t)
    return [{"start": round(s, 3), "end": round(e, 3), "speaker": lab} for s, e, lab in out]


def name_speakers(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Rename raw labels SPEAKER_00, 01 … by first appearance; the diar.json object."""
    names: dict[Any, str] = {}
    for t in sorted(turns, key=lambda t: (t["start"], t["end"])):
        names.setdefault(t["speaker"], f"SPEAKER_{len(names):02d}")
    renamed = [{**t, "speaker": names[t["speaker"]]} for t in turns]
    renamed.sort(key=lambda t: (t["start"], t["end"], t["speaker"]))
    return {"num_speakers": len(names), "turns": renamed}


def cluster(embeddings: np.ndarray, weights: np.ndarray, threshold: float, max_speakers: int,
            min_cluster: float, min_share: float = 0.0) -> np.ndarray:
    """Labels of L2-normalised embeddings; the number of clusters comes from the threshold."""
    from sklearn.cluster import AgglomerativeClustering

    n = len(embeddings)
    if n < 2:
        return np.zeros(n, dtype=int)
    algo = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average", distance_threshold=threshold)
    labels = algo.fit_predict(embeddings)
    if labels.max() + 1 > max_speakers:
        labels = AgglomerativeClustering(n_clusters=max_speakers, metric="cosine", linkage="average").fit_predict(
            embeddings)
    min_cluster = max(min_cluster, min_share * float(weights.sum()))
    while True:  # fold the smallest under-weight cluster into its nearest neighbour
        ids = np.unique(labels)
        if len(ids) < 2:
            break
        mass = np.array([weights[labels == k].sum() for k in ids])
        small = int(np.argmin(mass))
        if mass[small] >= min_cluster:
            break
        cents = np.stack([embeddings[labels == k].mean(0) for k in ids])
        cents /= np.linalg.norm(cents, axis=1, keepdims=True)
        sims = cents @ cents[small]
        sims[small] = -np.inf
        labels[labels == ids[small]] = ids[int(np.argmax(sims))]
    return labels


@register
class DiarizeStage(Extractor[DiarizeConfig]):
    name = "diarize"
    version = "2"
    Config = DiarizeConfig
    needs = frozenset({"audio"})
    resources = Resources(cpus=1.0)
    batch_size = 16

    def _weight_files(self) -> list[Path]:
        if self.config.backend == "pyannote":
            if not self.config.pipeline:
                load_pyannote(None)  # raises the ConfigError that names the setting
            root = Path(str(self.config.pipeline)).expanduser()
            if root.is_dir():
                return [p for p in root.rglob("*") if p.is_file()]
            return [root] if root.is_file() else []
        return [package_dir("silero_vad", "diarize") / "data" / "silero_vad.onnx",
                package_dir("resemblyzer", "diarize") / "pretrained.pt"]

    def weights_id(self) -> str:
        files = self._weight_files()
        if not files:  # a hub id: its revision is all we know
            return f"hub:{self.config.pipeline}"
        return file_digest(files)

    def setup(self) -> None:
        import torch

        torch.set_num_threads(self.config.threads)
        if self.config.backend == "pyannote":
            self._pipeline = load_pyannote(self.config.pipeline, self.config.token_env)
            return
        from silero_vad import load_silero_vad

        with contextlib.redirect_stdout(io.StringIO()):  # Resemblyzer prints on import and load
            from resemblyzer import VoiceEncoder

            self._encoder = VoiceEncoder("cpu", verbose=False)
        self._vad = load_silero_vad(onnx=True)
        self._mel = resemblyzer_mel()

    # -- offline backend --------------------------------------------------------------------
    def _regions(self, audio: np.ndarray, rate: int) -> list[tuple[float, float]]:
        import torch
        from silero_vad import get_speech_timestamps

        c = self.config
        self._vad.reset_states()
        stamps = get_speech_timestamps(torch.from_numpy(audio), self._vad, threshold=c.vad_threshold,
                                       sampling_rate=rate, min_speech_duration_ms=int(c.min_speech_s * 1000))
        return [(s["start"] / rate, s["end"] / rate) for s in stamps]

    def _windows(self, regions: list[tuple[float, float]], duration: float) -> list[tuple[int, float, float]]:
        """(region index, start, end) of fixed-length windows covering each region."""
        c = self.config
        out = []
        for r, (s, e) in enumerate(regions):
            if e - s <= c.window_s:
                mid = (s + e) / 2
                ws = min(max(0.0, mid - c.window_s / 2), max(0.0, duration - c.window_s))
                out.append((r, ws, ws + c.window_s))
                continue
            starts = [*np.arange(s, e - c.window_s, c.hop_s), e - c.window_s]
            out.extend((r, float(ws), float(ws) + c.window_s) for ws in starts)
        return out

    def _embed(self, mels: list[np.ndarray]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(mels), 64):
                out.append(self._encoder(torch.from_numpy(np.stack(mels[i:i + 64]))).numpy())
        return np.concatenate(out) if out else np.zeros((0, 256), np.float32)

    def _offline(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        import torch
        from resemblyzer.audio import normalize_volume
        from resemblyzer.hparams import audio_norm_target_dBFS

        c = self.config
        n_win = round(c.window_s / FRAME_S)
        plans, mels = [], []
        for v in videos:
            audio = np.asarray(v.audio, dtype=np.float32)
            regions = self._regions(audio, v.audio_rate)
            wins = self._windows(regions, len(audio) / v.audio_rate)
            if wins:
                wav = normalize_volume(audio, audio_norm_target_dBFS, increase_only=True).astype(np.float32)
                with torch.no_grad():
                    mel = self._mel(torch.from_numpy(wav)).numpy().T
                mel = np.pad(mel, ((0, n_win), (0, 0)))
                mels.extend(mel[round(ws / FRAME_S):round(ws / FRAME_S) + n_win] for _, ws, _ in wins)
            plans.append((regions, wins))
        embeddings = self._embed(mels)
        out: list[Members | UsvError] = []
        at = 0
        for regions, wins in plans:
            emb = embeddings[at:at + len(wins)]
            at += len(wins)
            if not wins:
                out.append({"diar.json": json_bytes({"num_speakers": 0, "turns": []})})
                continue
            covered = np.array([min(we, regions[r][1]) - max(ws, regions[r][0]) for r, ws, we in wins])
            share = np.maximum(covered, FRAME_S) * (c.hop_s / c.window_s)
            labels = cluster(emb, share, c.threshold, c.max_speakers, c.min_cluster_s, c.min_cluster_share)
            k = int(labels.max()) + 1
            frame_labels = []
            for r, (s, e) in enumerate(regions):
                votes = np.zeros((max(1, round((e - s) / FRAME_S)), k))
                for (wr, ws, we), lab in zip(wins, labels, strict=True):
                    if wr == r:
                        a, b = max(0, round((ws - s) / FRAME_S)), max(1, round((we - s) / FRAME_S))
                        votes[a:b, lab] += 1
                frame_labels.append(votes.argmax(1))
            turns = smooth_turns(regions, frame_labels, c.min_turn_s, c.merge_gap_s)
            out.append({"diar.json": json_bytes(name_speakers(turns))})
        return out

    # -- pyannote backend ---------------------------------------------------------------------
    def _pyannote(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        import torch

        out: list[Members | UsvError] = []
        for v in videos:
            wav = torch.from_numpy(np.asarray(v.audio, dtype=np.float32))[None]
            result = self._pipeline({"waveform": wav, "sample_rate": v.audio_rate},
                                    max_speakers=self.config.max_speakers)
            annotation = getattr(result, "speaker_diarization", result)  # 4.x wraps it in DiarizeOutput
            turns = [{"start": round(seg.start, 3), "end": round(seg.end, 3), "speaker": str(lab)}
                     for seg, _, lab in annotation.itertracks(yield_label=True)]
            out.append({"diar.json": json_bytes(name_speakers(turns))})
        return out

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        ok = [v for v in videos if v.audio is not None and v.audio.size > 0]
        done = iter(self._pyannote(ok) if self.config.backend == "pyannote" else self._offline(ok))
        return [next(done) if v.audio is not None and v.audio.size > 0
                else UsvError(ErrorKind.NO_AUDIO, "the video has no audio track") for v in videos]

    def table_rows(self, video_id: str, members: Members) -> dict[str, list[dict[str, Any]]]:
        import json

        diar = json.loads(members["diar.json"])
        return {"speaker_turns": [{"video_id": video_id, **t} for t in diar["turns"]]}


def load_pyannote(pipeline: str | None, token_env: str = "HF_TOKEN") -> Any:
    """A pyannote.audio Pipeline from a local folder/config.yaml, or from the hub with a token."""
    if not pipeline:
        raise ConfigError("diarize.backend=pyannote needs diarize.pipeline: a local folder holding the pipeline's "
                          "config.yaml (and the checkpoints it names), a config.yaml path, or a hub id such as "
                          "'pyannote/speaker-diarization-community-1' together with a token in $" + token_env)
    from pyannote.audio import Pipeline

    local = Path(pipeline).expanduser()
    token = os.environ.get(token_env) or None
    if not local.exists() and (token is None or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise ConfigError(f"diarize.pipeline={pipeline!r} is not a local folder or config.yaml, and the hub cannot "
                          f"be used (no token in ${token_env}, or HF_HUB_OFFLINE=1); point diarize.pipeline at a "
                          "local copy of the pipeline")
    try:
        loaded = Pipeline.from_pretrained(local if local.exists() else pipeline, token=token)
    except Exception as exc:  # pyannote raises many kinds; all mean "cannot load"
        raise ConfigError(f"diarize.pipeline={pipeline!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    if loaded is None:
        raise ConfigError(f"diarize.pipeline={pipeline!r} could not be loaded (gated or missing checkpoints?)")
    return loaded
