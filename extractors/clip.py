"""`clip`: open_clip image embeddings of the 1 fps frames, L2-normalised, float16 (N, D).

Frames of all videos in a batch are run together in batches of `batch_frames` (decision 5)
and split back per video. No CLIP weights exist offline here and nothing may reach a model
hub, so `pretrained` is either a local checkpoint file or an open_clip tag whose file is
already in the cache; anything else stops the run with a `ConfigError` naming the setting.
Random weights are only an explicit choice (`random_weights: true`): then the provenance,
the cache key and every `clip.json` say so, and a loud warning is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

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
from usv.errors import ConfigError, UsvError

log = logging.getLogger(__name__)
FIX = ("set stage_config.clip.pretrained: /path/to/checkpoint.pt (an open_clip state_dict for that model), "
       "or stage_config.clip.random_weights: true to run with random weights (marked as such everywhere)")


class ClipConfig(StageConfig):
    model: str = "ViT-B-32"
    pretrained: str = Field("openai", description="open_clip pretrained tag (must be cached) or checkpoint path")
    random_weights: bool = Field(False, description="use a seeded random init instead of weights (explicit only)")
    seed: int = 0
    batch_frames: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="CPU arithmetic; auto: bfloat16 where the CPU has AMX bf16 tiles (≈4× faster "
                            "ViT-B/32, cosine to float32 ≥ 0.9999), else float32. CUDA runs float32")
    cache_dir: str | None = Field(None, description="open_clip download cache (default ~/.cache/clip and the HF cache)")


def _cpu_has_amx() -> bool:
    """AMX bf16 tiles (Intel Sapphire Rapids and later): where bfloat16 matmuls are several times faster."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cached_tag(model: str, tag: str, cache_dir: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The local file of an open_clip pretrained tag, without any network access."""
    import open_clip
    from open_clip.pretrained import _get_safe_alternatives

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        return None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        for name in [*_get_safe_alternatives(filename), filename]:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit), cfg
    if cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if path.is_file():
            return path, cfg
    return None


@register
class ClipStage(Extractor[ClipConfig]):
    name = "clip"
    version = "1"
    Config = ClipConfig
    needs = frozenset({"frames"})
    resources = Resources(cpus=2.0, gpus=0.0)
    batch_size = 8

    def _checkpoint(self) -> tuple[Path, dict[str, Any]]:
        """The weight file to load and the tag's config ({} for a plain file); ConfigError if none."""
        c = self.config
        path = Path(c.pretrained).expanduser()
        if path.is_file():
            return path, {}
        found = _cached_tag(c.model, c.pretrained, c.cache_dir)
        if found is None:
            raise ConfigError(f"CLIP weights {c.pretrained!r} for model {c.model!r} are not on this machine (not a "
                              f"file, and not an open_clip tag in the local cache; nothing is downloaded): {FIX}")
        return found

    def weights_id(self) -> str:
        if self.config.random_weights:
            return f"random-{self.config.seed}"
        return file_digest([self._checkpoint()[0]])

    def cpu_precision(self) -> str:
        """The CPU precision "auto" resolves to here (in the fingerprint: bfloat16 output is not float32's)."""
        if self.config.precision != "auto":
            return self.config.precision
        return "bfloat16" if _cpu_has_amx() else "float32"

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "random_weights": self.config.random_weights,
                "cpu_precision": self.cpu_precision()}

    def setup(self) -> None:
        import open_clip
        import torch

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        self.device = torch.device("cuda" if c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
        if c.random_weights:
            log.warning("CLIP stage uses RANDOM WEIGHTS (seed %d): its features carry no meaning; "
                        "clip.json and the provenance say random_weights=true", c.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(c.model, pretrained=None)
        else:
            path, tag_cfg = self._checkpoint()
            model, _, preprocess = open_clip.create_model_and_transforms(  # the tag's settings, the local file
                c.model, pretrained=str(path), force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                **{f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
        dtype = torch.bfloat16 if self.device.type == "cpu" and self.cpu_precision() == "bfloat16" else torch.float32
        self.model = model.to(self.device, dtype=dtype).eval()
        self.dtype = dtype
        self.preprocess = preprocess

    def embed(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Frames (H, W, 3) uint8, any sizes → (N, D) float32 L2-normalised, `batch_frames` at a time."""
        import torch
        from PIL import Image

        out = [np.zeros((0, int(self.model.visual.output_dim)), np.float32)]
        for start in range(0, len(frames), self.config.batch_frames):
            chunk = frames[start:start + self.config.batch_frames]
            batch = torch.stack([self.preprocess(Image.fromarray(np.asarray(f))) for f in chunk])
            batch = batch.to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                feats = self.model.encode_image(batch).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out)

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        feats = self.embed([f for v in videos if v.frames is not None for f in v.frames])
        c = self.config
        out: list[Members | UsvError] = []
        start = 0
        for v in videos:
            assert v.frames is not None and v.frame_times is not None
            part = feats[start:start + len(v.frames)]
            start += len(v.frames)
            out.append({"clip.npy": npy_bytes(part.astype(np.float16)), "clip.json": json_bytes({
                "times": [round(float(t), 3) for t in v.frame_times], "model": c.model,
                "pretrained": f"random-{c.seed}" if c.random_weights else c.pretrained,
                "random_weights": c.random_weights})})
        return out
