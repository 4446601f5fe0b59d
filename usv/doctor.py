"""`usv doctor`: check the environment before a long run, not an hour into it.

ffmpeg/ffprobe and the decoders the corpus needs, every requested stage's settings and
weights (the same `fingerprint()` the build's preflight calls, so a pass here means the
build starts), optionally loading each model, the Prefect API, free disk at the output root.
Exit code 1 when something a requested stage needs is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from usv.config import BuildConfig
from usv.errors import ConfigError

Status = Literal["ok", "warn", "fail"]
DECODERS = ("h264", "aac")


@dataclass
class Check:
    name: str
    status: Status
    detail: str


def check_tools() -> list[Check]:
    out = []
    for tool in ("ffmpeg", "ffprobe"):
        path = shutil.which(tool)
        if not path:
            out.append(Check(tool, "fail", f"{tool} not on PATH (Debian: apt-get install ffmpeg)"))
            continue
        proc = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
        first = (proc.stdout.splitlines() or ["?"])[0].split(" Copyright")[0]
        out.append(Check(tool, "ok" if proc.returncode == 0 else "fail", f"{path}: {first}"))
    return out


def check_decoders(wanted: tuple[str, ...] = DECODERS) -> list[Check]:
    """ffmpeg's decoder list: `' V....D h264  H.264 …'`, the name is the second field."""
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        return [Check(f"decoder {d}", "fail", "no ffmpeg") for d in wanted]
    proc = subprocess.run([ffmpeg, "-hide_banner", "-decoders"], capture_output=True, text=True, timeout=30)
    names = {parts[1] for line in proc.stdout.splitlines() if len(parts := line.split()) > 1}
    return [Check(f"decoder {d}", "ok" if d in names else "fail",
                  "available" if d in names else f"ffmpeg has no {d} decoder: videos using it cannot be decoded")
            for d in wanted]


def random_flags(obj: Any, path: str = "") -> list[str]:
    """Provenance keys that say a model has random weights."""
    if isinstance(obj, dict):
        return [f for k, v in obj.items() for f in random_flags(v, f"{path}.{k}" if path else k)]
    return [path] if "random" in path and obj is True else []


def check_stage(name: str, settings: dict[str, Any], load: bool) -> Check:
    """Instantiate the stage and hash its weights (as the build's preflight does); optionally load it."""
    from extractors.base import make_stage

    t0 = time.perf_counter()
    try:
        stage = make_stage(name, settings)
        stage.fingerprint()
        weights = stage.weights_id()
        if load:
            stage.ensure_setup()
    except ConfigError as exc:
        return Check(f"stage {name}", "fail", str(exc))
    except Exception as exc:  # noqa: BLE001 - a broken stage must be reported, not crash the doctor
        return Check(f"stage {name}", "fail", f"{type(exc).__name__}: {exc}")
    detail = f"weights {weights}" if weights else "no model weights"
    if load:
        detail += f", loaded in {time.perf_counter() - t0:.1f} s"
    flags = random_flags(stage.provenance())
    if flags:
        return Check(f"stage {name}", "warn", f"{detail}; RANDOM WEIGHTS ({', '.join(flags)}): features are noise")
    return Check(f"stage {name}", "ok", detail)


def check_stages(cfg: BuildConfig, load: bool) -> list[Check]:
    from extractors.base import order_stages

    try:
        names = order_stages(cfg.stages)
    except ConfigError as exc:
        return [Check("stages", "fail", str(exc))]
    return [check_stage(n, cfg.stage_config.get(n, {}), load) for n in names]


def check_prefect() -> Check:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return Check("prefect api", "ok", "PREFECT_API_URL not set: `usv build` runs a temporary in-process server")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as resp:
            ok = resp.status == 200
    except OSError as exc:
        return Check("prefect api", "fail", f"{url} unreachable ({exc}); start it with `usv server up`")
    return Check("prefect api", "ok" if ok else "fail", f"{url}/health answered {'200' if ok else 'not 200'}")


def check_disk(root: str, min_free_gb: float) -> Check:
    if "://" in root:
        return Check("disk", "ok", f"{root} is remote: free space not checked")
    path = Path(root).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        return Check("disk", "fail", f"{existing} is not writable (output root {path})")
    free = shutil.disk_usage(existing).free / 1024**3
    status: Status = "ok" if free >= min_free_gb else "warn"
    return Check("disk", status, f"{free:.1f} GiB free at {existing} (want ≥{min_free_gb:g} GiB)")


def check_accelerator() -> Check:
    try:
        import torch
    except ImportError:
        return Check("accelerator", "ok", "torch not installed: CPU only")
    if torch.cuda.is_available():
        return Check("accelerator", "ok", f"CUDA: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU)")
    return Check("accelerator", "ok", f"CPU only ({os.cpu_count()} cores); GPU stages run on CPU")


def run_checks(cfg: BuildConfig, load: bool = False, min_free_gb: float = 10.0,
               quiet: bool = True) -> list[Check]:
    from usv.progress import track

    groups: list[Callable[[], list[Check]]] = [
        check_tools, check_decoders, lambda: check_stages(cfg, load), lambda: [check_prefect()],
        lambda: [check_disk(cfg.output, min_free_gb)], lambda: [check_accelerator()]]
    return [c for group in track(groups, "doctor", quiet=quiet) for c in group()]


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        stages: Annotated[str | None, typer.Option(help="comma-separated stages (default: the config's)")] = None,
        config: Annotated[str | None, typer.Option(help="YAML BuildConfig")] = None,
        output: Annotated[str | None, typer.Option(help="output root whose disk to check")] = None,
        load: Annotated[bool, typer.Option(help="also load every stage's models (slow, thorough)")] = False,
        min_free_gb: Annotated[float, typer.Option(help="warn below this much free disk")] = 10.0,
        as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only problems")] = False,
    ) -> None:
        """Check ffmpeg, stage weights, the Prefect API and disk before a long run; exit 1 if a stage cannot run."""
        overrides = {"stages": [s.strip() for s in stages.split(",") if s.strip()] if stages else None,
                     "output": output}
        cfg = BuildConfig.from_yaml(config, **overrides) if config else BuildConfig.model_validate(
            {k: v for k, v in overrides.items() if v is not None})
        checks = run_checks(cfg, load, min_free_gb, quiet=quiet or as_json)
        failed = any(c.status == "fail" for c in checks)
        if as_json:
            typer.echo(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=1))
        else:
            _print(checks, quiet)
        raise typer.Exit(1 if failed else 0)


def _print(checks: list[Check], quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    shown = [c for c in checks if c.status != "ok"] if quiet else checks
    if not shown:
        return
    tab = Table("check", "status", "detail")
    for c in shown:
        tab.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    Console().print(tab)
