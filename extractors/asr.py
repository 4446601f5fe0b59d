"""`asr`: speech to text as `asr.json` {"language", "language_probability", "text", "segments": [...]}.

Engines: `faster-whisper` (default) with the multilingual *base* CTranslate2 weights assembled
from their two offline packages (`extractors.weights`), the tiny.en package, or any local
CTranslate2 folder; `openai-whisper` for users who have `.pt` checkpoints (`whisper.load_model`).
Silero VAD drops non-speech first and cuts the speech into ≤30 s windows.

Throughput (issue 6): with faster-whisper the windows of all videos in a batch go through the
model together — one encoder pass per window, whose output serves both the per-video language
detection and the decoding, then one batched beam search over all windows. `transcribe()` on
each file would encode every window twice (language detection, then decoding) and decode one
window at a time; on 8 s videos the batched path is ≈2× faster with identical transcripts
(measured on the benchmark corpus). A window's result does not depend on its batch neighbours
beyond float rounding: each has its own prompt and its own encoder output.

Determinism and hallucination control are settings, not defaults to trust (DESIGN.md): decoding
runs at temperature 0 only — the default temperature fallback made output change from run to
run — and never conditions on the previous text. A guard then drops segments that look
invented: high no-speech probability with a low log-probability, a compression ratio above
2.4 (looping text), or the same line repeated more than `max_repeats` times in a row. No speech
gives an empty transcript, not an error.

Speakers: every segment gets the `diarize` speaker whose turns overlap it most (null when
none does), so `asr` requires `diarize`. The trade-off: asr's cache key includes diarize's, so
changing diarization settings re-runs ASR (diarization is ~0.2 s/video, ASR a few seconds). The
alternative — a separate cheap "join" stage — would add a shard member or stage name outside
the agreed formats, so it was not taken.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from extractors.base import Extractor, Members, Resources, StageConfig, Video, file_digest, json_bytes, register
from extractors.weights import ct2_model_dir
from usv.errors import ConfigError, ErrorKind, UsvError

CHUNK_S = 30.0


class AsrConfig(StageConfig):
    engine: Literal["faster-whisper", "openai-whisper"] = "faster-whisper"
    model: str = Field("base", description="faster-whisper: 'base', 'tiny.en' or a CTranslate2 folder; "
                                           "openai-whisper: a .pt checkpoint path")
    models_dir: str | None = Field(None, description="cache for assembled models (default ~/.cache/usv/models)")
    language: str | None = Field(None, description="None detects the language per video")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = Field("default", description="default: int8 on CPU (same WER as float32 on LibriVox, "
                                                     "≈1.2-1.4× faster), float16 on CUDA")
    threads: int = Field(2, ge=0, description="CPU threads; 0 lets the engine choose")
    beam_size: int = Field(5, ge=1)
    batch_windows: int = Field(8, ge=1, description="faster-whisper: 30 s windows encoded and decoded together")
    vad_min_silence_ms: int = Field(500, ge=0)
    no_speech_prob: float = Field(0.6, description="drop a segment above this no-speech probability …")
    logprob_floor: float = Field(-0.5, description="… when its average log-probability is below this")
    max_compression: float = Field(2.4, description="drop segments whose text compresses better (loops)")
    max_repeats: int = Field(2, ge=1, description="keep at most this many identical consecutive lines")


def compression_ratio(text: str) -> float:
    """Whisper's loop detector: raw bytes over zlib-compressed bytes."""
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def guard(segments: list[dict[str, Any]], cfg: AsrConfig) -> list[dict[str, Any]]:
    """Drop segments that look hallucinated (see the module docstring)."""
    kept: list[dict[str, Any]] = []
    run = 0
    for s in segments:
        text = _norm(s["text"])
        if not text:
            continue
        if s["no_speech_prob"] > cfg.no_speech_prob and s["avg_logprob"] < cfg.logprob_floor:
            continue
        if compression_ratio(s["text"]) > cfg.max_compression:
            continue
        run = run + 1 if kept and _norm(kept[-1]["text"]) == text else 1
        if run > cfg.max_repeats:
            continue
        kept.append(s)
    return kept


def assign_speakers(segments: list[dict[str, Any]], turns: list[dict[str, Any]]) -> None:
    """Give each segment the speaker with the largest time overlap (None when nothing overlaps)."""
    for s in segments:
        overlap: dict[str, float] = {}
        for t in turns:
            o = min(s["end"], t["end"]) - max(s["start"], t["start"])
            if o > 0:
                overlap[t["speaker"]] = overlap.get(t["speaker"], 0.0) + o
        s["speaker"] = max(sorted(overlap), key=lambda k: overlap[k]) if overlap else None


def _segment(start: float, end: float, text: str, avg_logprob: float, no_speech_prob: float) -> dict[str, Any]:
    return {"start": round(float(start), 3), "end": round(float(end), 3), "text": text.strip(),
            "avg_logprob": round(float(avg_logprob), 4), "no_speech_prob": round(float(no_speech_prob), 4)}


@register
class AsrStage(Extractor[AsrConfig]):
    name = "asr"
    version = "2"  # 2: windows batched across videos, int8 on CPU
    Config = AsrConfig
    needs = frozenset({"audio"})
    requires = ("diarize",)
    resources = Resources(cpus=2.0)
    batch_size = 8

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov["config"].pop("models_dir", None)  # where the cache lives does not change the output
        return prov

    def _model_files(self) -> list[Path]:
        if self.config.engine == "openai-whisper":
            path = Path(self.config.model).expanduser()
            if not path.is_file():
                raise ConfigError(f"asr.model={self.config.model!r}: the openai-whisper engine needs a local .pt "
                                  "checkpoint (model names cannot be downloaded here)")
            return [path]
        return [ct2_model_dir(self.config.model, self.config.models_dir) / "model.bin"]

    def weights_id(self) -> str:
        return file_digest(self._model_files())

    def _device(self) -> str:
        if self.config.device != "auto":
            return self.config.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def setup(self) -> None:
        device = self._device()
        compute = self.config.compute_type
        if compute == "default":
            compute = "float16" if device == "cuda" else "int8"
        if self.config.engine == "openai-whisper":
            import torch
            import whisper

            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            self._whisper = whisper.load_model(str(self._model_files()[0]), device=device)
            self._fp16 = compute == "float16"
            return
        from faster_whisper import WhisperModel

        folder = self._model_files()[0].parent
        self._model = WhisperModel(str(folder), device=device, compute_type=compute, cpu_threads=self.config.threads)

    # -- engines --------------------------------------------------------------------------------
    def _faster(self, audios: Sequence[np.ndarray]) -> list[tuple[str | None, float | None, list[dict[str, Any]]]]:
        """Every track's speech windows through faster-whisper's model in batches (module docstring)."""
        from faster_whisper.vad import SpeechTimestampsMap, VadOptions, collect_chunks, get_speech_timestamps

        c = self.config
        vad = VadOptions(min_silence_duration_ms=c.vad_min_silence_ms, max_speech_duration_s=CHUNK_S)
        windows: list[tuple[int, np.ndarray, dict[str, Any]]] = []  # (track, speech audio, chunk metadata)
        maps: dict[int, SpeechTimestampsMap] = {}
        for i, audio in enumerate(audios):
            stamps = get_speech_timestamps(audio, vad)
            if stamps:
                maps[i] = SpeechTimestampsMap(stamps, 16000)
                chunks, metas = collect_chunks(audio, stamps, max_duration=CHUNK_S)
                windows += [(i, chunk, meta) for chunk, meta in zip(chunks, metas, strict=True) if chunk.size]
        language: dict[int, tuple[str, float | None]] = {}
        segments: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(audios))}
        for start in range(0, len(windows), c.batch_windows):
            part = windows[start:start + c.batch_windows]
            for (i, _, meta), tokenizer, result in zip(part, *self._decode_windows(part, language), strict=True):
                segments[i] += self._window_segments(tokenizer, result, meta, maps[i])
        return [(*language.get(i, (None, None)), segments[i]) for i in range(len(audios))]

    def _decode_windows(self, part: list[tuple[int, np.ndarray, dict[str, Any]]],
                        language: dict[int, tuple[str, float | None]]) -> tuple[list[Any], list[Any]]:
        """One encoder pass and one batched beam search over `part`; fills `language` (a track's
        language is detected on its first window, as `transcribe()` does)."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model, c = self._model, self.config
        features = np.stack([pad_or_trim(model.feature_extractor(chunk)[..., :-1]) for _, chunk, _ in part])
        encoded = model.encode(features)
        detected = model.model.detect_language(encoded) if c.language is None else [None] * len(part)
        tokenizers, prompts = [], []
        for (i, _, _), probs in zip(part, detected, strict=True):
            if i not in language:
                language[i] = (c.language, 1.0) if probs is None else (probs[0][0][2:-2], float(probs[0][1]))
            tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                                  language=language[i][0])
            tokenizers.append(tokenizer)
            prompts.append(model.get_prompt(tokenizer, [], without_timestamps=False))
        results = model.model.generate(
            encoded, prompts, beam_size=c.beam_size, max_length=model.max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True, max_initial_timestamp_index=50,
            suppress_tokens=get_suppressed_tokens(tokenizers[0], [-1]))
        return tokenizers, results

    def _window_segments(self, tokenizer: Any, result: Any, meta: dict[str, Any], times: Any) -> list[dict[str, Any]]:
        """A window's tokens split at whisper's timestamp tokens, in the track's own time."""
        model = self._model
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # length_penalty 1, as transcribe()
        duration = meta["duration"]
        pieces, _, _ = model._split_segments_by_timestamps(
            tokenizer=tokenizer, tokens=tokens, time_offset=meta["offset"], seek=0, segment_duration=duration,
            segment_size=int(np.ceil(duration) * model.frames_per_second))
        return [_segment(times.get_original_time(p["start"]), times.get_original_time(p["end"], is_end=True),
                         tokenizer.decode(p["tokens"]), avg_logprob, result.no_speech_prob) for p in pieces]

    def _chunks(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """Silero speech regions, grouped into chunks of at most 30 s (openai-whisper has no VAD)."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        stamps = get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=self.config.vad_min_silence_ms))
        chunks: list[list[int]] = []
        for s in stamps:
            if chunks and s["end"] - chunks[-1][0] <= CHUNK_S * 16000:
                chunks[-1][1] = s["end"]
            else:
                chunks.append([s["start"], min(s["end"], s["start"] + int(CHUNK_S * 16000))])
        return [(a, b) for a, b in chunks]

    def _openai(self, audio: np.ndarray) -> tuple[str | None, float | None, list[dict[str, Any]]]:
        import torch
        import whisper

        c = self.config
        model = self._whisper
        language, prob, segs = c.language, None, []
        for a, b in self._chunks(audio):
            piece = audio[a:b]
            if language is None or prob is None:
                mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(piece)), model.dims.n_mels)
                _, probs = model.detect_language(mel.to(model.device))
                best = max(sorted(probs), key=lambda k: probs[k])
                language, prob = language or best, float(probs[language or best])
            out = model.transcribe(piece, language=language, temperature=0.0, beam_size=c.beam_size,
                                   condition_on_previous_text=False, fp16=self._fp16, verbose=None,
                                   no_speech_threshold=c.no_speech_prob, logprob_threshold=c.logprob_floor,
                                   compression_ratio_threshold=c.max_compression)
            segs += [_segment(a / 16000 + s["start"], a / 16000 + s["end"], s["text"], s["avg_logprob"],
                              s["no_speech_prob"]) for s in out["segments"]]
        return language, prob, segs

    def transcribe_many(self, audios: Sequence[np.ndarray], rate: int = 16000) -> list[dict[str, Any]]:
        """The asr.json objects of several 16 kHz tracks (speakers not yet assigned)."""
        if rate != 16000:
            raise UsvError(ErrorKind.MODEL, f"whisper needs 16 kHz audio, got {rate} Hz (decode.audio_rate)")
        self.ensure_setup()
        audios = [np.ascontiguousarray(a, dtype=np.float32) for a in audios]
        raw = [self._openai(a) for a in audios] if self.config.engine == "openai-whisper" else self._faster(audios)
        out = []
        for language, prob, segs in raw:
            segs = guard(segs, self.config)
            if not segs:
                language, prob = None, None
            for s in segs:
                s["speaker"] = None
            out.append({"language": language, "language_probability": None if prob is None else round(prob, 4),
                        "text": " ".join(s["text"] for s in segs), "segments": segs})
        return out

    def transcribe(self, audio: np.ndarray, rate: int = 16000) -> dict[str, Any]:
        """The asr.json object of one track (speakers not yet assigned)."""
        return self.transcribe_many([audio], rate)[0]

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        heard = [i for i, v in enumerate(videos) if v.audio is not None and v.audio.size]
        tracks = [videos[i].audio for i in heard]
        rate = videos[heard[0]].audio_rate if heard else 16000
        results = dict(zip(heard, self.transcribe_many(tracks, rate), strict=True)) if heard else {}
        out: list[Members | UsvError] = []
        for i, v in enumerate(videos):
            if i not in results:
                out.append(UsvError(ErrorKind.NO_AUDIO, "the video has no audio track"))
                continue
            result = results[i]
            diar = v.upstream.get("diarize", {}).get("diar.json")
            assign_speakers(result["segments"], json.loads(diar)["turns"] if diar else [])
            out.append({"asr.json": json_bytes(result)})
        return out

    def table_rows(self, video_id: str, members: Members) -> dict[str, list[dict[str, Any]]]:
        asr = json.loads(members["asr.json"])
        return {"asr_segments": [{"video_id": video_id, "index": i, "language": asr["language"], **s}
                                 for i, s in enumerate(asr["segments"])]}
