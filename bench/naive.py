"""Contestant B: the per-video script a user would write with the same libraries and weights.

Models are loaded once, then each video is processed on its own, stage after stage, and every
stage decodes what it needs itself (OCR and CLIP each extract the 1 fps frames at full
resolution; ASR hands the file to faster-whisper; VAD/diarization and the mel spectrogram
each decode the audio track). Each library is called with its defaults: `RapidOCR()` on every
frame, `WhisperModel.transcribe(path)`, open_clip one frame per call, silero's
`get_speech_timestamps`, Resemblyzer's `embed_utterance`, sentence-transformers one text per
call. The video-level subtitle and speaker count use the project's own post-processing
(`extractors.ocr_text`, `extractors.diarize.cluster`), so the comparison measures the models'
outputs, not two different subtitle rules. It writes the same member files as the pipeline
(`<out>/<video_id>/ocr.json` …) and `<out>/timings.json` (seconds per stage, models' load times).

Run: `python -m bench.naive MANIFEST OUT --clip-model ViT-B-32 --clip-pretrained CKPT`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from extractors.base import json_bytes, npy_bytes
from extractors.media import decode_audio, decode_frames, probe
from extractors.ocr import OcrConfig
from extractors.ocr_text import join_rows, mark_watermarks, subtitle_lines
from storage.manifest import load_manifest

STAGES = ("ocr", "clip", "asr", "diarize", "mel", "text")


class Naive:
    """Loaded models plus per-stage timers; `video(path, title)` returns the members of one video."""

    def __init__(self, clip_model: str, clip_pretrained: str, scratch: Path, stages: tuple[str, ...] = STAGES) -> None:
        self.scratch, self.stages = scratch, stages
        self.seconds: dict[str, float] = defaultdict(float)
        self.load: dict[str, float] = {}
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self._load_all()

    def _timed_load(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.load[stage] = time.perf_counter() - t0
        return out

    def _load_all(self) -> None:
        import contextlib
        import io

        from extractors.weights import ct2_model_dir, minilm_dir

        if "ocr" in self.stages:
            from rapidocr_onnxruntime import RapidOCR

            self.ocr = self._timed_load("ocr", RapidOCR)
        if "clip" in self.stages:
            import open_clip

            self.clip, _, self.preprocess = self._timed_load("clip", lambda: open_clip.create_model_and_transforms(
                self.clip_model, pretrained=self.clip_pretrained))
            self.clip.eval()
        if "asr" in self.stages:
            from faster_whisper import WhisperModel

            self.whisper = self._timed_load("asr", lambda: WhisperModel(str(ct2_model_dir("base")), device="cpu"))
        if "diarize" in self.stages:
            from silero_vad import load_silero_vad

            def diar() -> tuple[Any, Any]:
                with contextlib.redirect_stdout(io.StringIO()):
                    from resemblyzer import VoiceEncoder

                    return load_silero_vad(onnx=True), VoiceEncoder("cpu", verbose=False)

            self.vad, self.encoder = self._timed_load("diarize", diar)
        if "text" in self.stages:
            from sentence_transformers import SentenceTransformer

            self.text_model = self._timed_load("text", lambda: SentenceTransformer(str(minilm_dir()), device="cpu"))

    def _frames(self, path: str) -> np.ndarray:
        meta = probe(path)
        frames, _ = decode_frames(path, meta, 1.0, (meta.width, meta.height), self.scratch / "frames.rgb")
        return np.array(frames)  # a user's list of full-resolution frames, in memory

    def ocr_json(self, path: str) -> dict[str, Any]:
        cfg = OcrConfig()
        frames = self._frames(path)
        out = []
        for i, frame in enumerate(frames):
            result, _ = self.ocr(np.ascontiguousarray(frame[..., ::-1]))
            lines = [{"text": str(text).strip(), "conf": float(conf),
                      "box": [[float(x), float(y)] for x, y in box]}
                     for box, text, conf in result or [] if float(conf) >= cfg.min_conf and str(text).strip()]
            out.append({"t": float(i), "lines": join_rows(lines)})
        h, w = frames.shape[1:3]
        marks = mark_watermarks(out, w, h, cfg.watermark_min_fraction, cfg.watermark_min_frames,
                                cfg.watermark_max_shift, cfg.similarity)
        lines = subtitle_lines(out, [f["t"] for f in out], 1.0, cfg.max_gap, cfg.similarity)
        return {"frames": out, "watermarks": marks, "subtitle_lines": lines,
                "subtitle": "\n".join(ln["text"] for ln in lines)}

    def clip_npy(self, path: str) -> np.ndarray:
        import torch
        from PIL import Image

        embs = []
        for frame in self._frames(path):
            with torch.no_grad():
                e = self.clip.encode_image(self.preprocess(Image.fromarray(frame)).unsqueeze(0))
            embs.append(torch.nn.functional.normalize(e, dim=-1)[0].numpy())
        return np.stack(embs)

    def asr_json(self, path: str) -> dict[str, Any]:
        segments, info = self.whisper.transcribe(path)
        segs = [{"start": s.start, "end": s.end, "text": s.text} for s in segments]
        return {"language": info.language, "text": " ".join(s["text"].strip() for s in segs).strip(),
                "segments": segs}

    def diar_json(self, path: str) -> dict[str, Any]:
        import torch
        from silero_vad import get_speech_timestamps

        from extractors.diarize import DiarizeConfig, cluster

        wav = decode_audio(path)
        stamps = get_speech_timestamps(torch.from_numpy(wav), self.vad, sampling_rate=16000)
        embs, weights = [], []
        for s in stamps:
            seg = wav[s["start"]:s["end"]]
            if len(seg) < 16000 * 0.5:
                continue
            _, partials, _ = self.encoder.embed_utterance(seg, return_partials=True)
            embs.extend(partials)
            weights.extend([(s["end"] - s["start"]) / 16000 / len(partials)] * len(partials))
        if not embs:
            return {"num_speakers": 0}
        cfg = DiarizeConfig()
        labels = cluster(np.stack(embs), np.array(weights), cfg.threshold, cfg.max_speakers, cfg.min_cluster_s)
        return {"num_speakers": len(set(labels.tolist()))}

    def mel_npy(self, path: str) -> np.ndarray:
        import torch
        import torchaudio

        wav = torch.from_numpy(decode_audio(path))
        mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=1280, win_length=512, hop_length=256,
                                                   n_mels=80, power=2.0)(wav)
        return torch.log(mel + 1e-6).numpy().astype(np.float16)

    def text_npy(self, texts: list[str]) -> np.ndarray:
        dim = self.text_model.get_sentence_embedding_dimension() or 384
        return np.stack([self.text_model.encode(t) if t.strip() else np.zeros(dim, np.float32) for t in texts])

    def _time(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] += time.perf_counter() - t0
        return out

    def video(self, path: str, title: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        ocr: dict[str, Any] = {"subtitle": ""}
        asr: dict[str, Any] = {"text": ""}
        if "ocr" in self.stages:
            ocr = self._time("ocr", lambda: self.ocr_json(path))
            out["ocr.json"] = json_bytes(ocr)
        if "clip" in self.stages:
            out["clip.npy"] = npy_bytes(self._time("clip", lambda: self.clip_npy(path)).astype(np.float16))
        if "asr" in self.stages:
            asr = self._time("asr", lambda: self.asr_json(path))
            out["asr.json"] = json_bytes(asr)
        if "diarize" in self.stages:
            out["diar.json"] = json_bytes(self._time("diarize", lambda: self.diar_json(path)))
        if "mel" in self.stages:
            out["mel.npy"] = npy_bytes(self._time("mel", lambda: self.mel_npy(path)))
        if "text" in self.stages:
            text = self._time("text", lambda: self.text_npy([title, ocr["subtitle"], asr["text"]]))
            out["text.npy"] = npy_bytes(text.astype(np.float16))
        return out


def run(manifest: str, out: Path, clip_model: str, clip_pretrained: str,
        stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Process every video of `manifest` one at a time; write members and timings under `out`."""
    t0 = time.perf_counter()
    rows = load_manifest(manifest).rows
    with tempfile.TemporaryDirectory(prefix="usv-naive-") as tmp:
        naive = Naive(clip_model, clip_pretrained, Path(tmp), stages)
        for row in rows:
            members = naive.video(row.source, row.title)
            folder = out / row.video_id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in members.items():
                (folder / name).write_bytes(data)
    timings = {"stages": dict(naive.seconds), "load": naive.load, "videos": len(rows),
               "wall": time.perf_counter() - t0}
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest")
    ap.add_argument("out", type=Path)
    ap.add_argument("--clip-model", required=True)
    ap.add_argument("--clip-pretrained", required=True)
    ap.add_argument("--stages", default=",".join(STAGES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = tuple(s for s in args.stages.split(",") if s in STAGES)
    print(json.dumps(run(args.manifest, args.out, args.clip_model, args.clip_pretrained, stages)))


if __name__ == "__main__":
    main()
