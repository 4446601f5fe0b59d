"""`frames`: JPEG thumbnails of the 1 fps frames, for inspection and image-level training."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image
from pydantic import Field

from extractors.base import Extractor, Members, StageConfig, Video, json_bytes, register
from extractors.media import working_size
from usv.errors import UsvError


class FramesConfig(StageConfig):
    short_side: int = Field(256, ge=16)
    quality: int = Field(85, ge=10, le=100)
    every: int = Field(1, ge=1, description="keep every n-th decoded frame")


@register
class FramesStage(Extractor[FramesConfig]):
    name = "frames"
    version = "1"
    Config = FramesConfig
    needs = frozenset({"frames"})
    batch_size = 16

    def process(self, videos: Sequence[Video]) -> list[Members | UsvError]:
        out: list[Members | UsvError] = []
        for v in videos:
            assert v.frames is not None and v.frame_times is not None
            members: Members = {}
            idx = range(0, len(v.frames), self.config.every)
            for i in idx:
                img = Image.fromarray(v.frames[i])
                size = working_size(img.width, img.height, self.config.short_side, 10**6)
                buf = io.BytesIO()
                img.resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=self.config.quality)
                members[f"frame{i:04d}.jpg"] = buf.getvalue()
            members["frames.json"] = json_bytes({"times": [float(v.frame_times[i]) for i in idx]})
            out.append(members)
        return out
