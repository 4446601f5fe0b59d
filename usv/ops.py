"""Operations on an output root: `usv status` (what is done, failed, slow, pending) and `usv retry`.

The ledger says what happened; the feature store says what exists. Status joins both with the
manifest and the settings of the last build (`state/build.json`): a video is *done* for a stage
when the output for the current settings exists, *failed* when its latest attempt is an error,
and *pending* otherwise (never tried, a killed run, or settings changed since). Retry re-runs
only the (video, stage) pairs a person chose, by error type or by id, with that same config.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

import pyarrow.compute as pc
import typer

from flows.pipeline import INGEST, load_stages, process_batch
from storage.atomic import join, read_json
from storage.cache_keys import stage_keys
from storage.feature_store import FeatureStore
from storage.ledger import Ledger
from storage.lock import RootLock
from storage.manifest import Manifest, ManifestRow, load_manifest
from storage.pack import Packer
from usv.config import BuildConfig
from usv.errors import ConfigError, ErrorKind

SHOWN = 10  # ids listed per error kind / pending list in the human output


def resolve_root(root: str) -> str:
    return root if "://" in root else str(Path(root).expanduser().resolve())


def last_build(root: str) -> dict[str, Any] | None:
    try:
        return read_json(join(root, "state", "build.json"))
    except FileNotFoundError:
        return None


def _done(cfg: BuildConfig, manifest: Manifest) -> dict[str, set[str]] | None:
    """Per stage, the manifest ids whose output for the current settings is in the feature store."""
    try:
        stages = load_stages(cfg)
        fps = {s.name: s.fingerprint() for s in stages}
    except ConfigError:  # e.g. weights gone: fall back to the ledger alone
        return None
    store = FeatureStore(cfg.output)
    present = {s.name: store.present(s.name, fps[s.name]) for s in stages}
    done: dict[str, set[str]] = {s.name: set() for s in stages}
    done[INGEST] = set()
    for row in manifest.rows:
        try:
            memo = read_json(join(cfg.output, "state", "ingest", f"{row.video_id}.json"))
        except (FileNotFoundError, ValueError):
            continue
        if memo.get("source") != row.source:
            continue
        done[INGEST].add(row.video_id)
        for name, key in stage_keys(stages, memo["sha256"], row).items():
            if f"{row.video_id}-{key}.parquet" in present[name]:
                done[name].add(row.video_id)
    return done


def status_summary(root: str, manifest_url: str | None = None, slowest: int = 5) -> dict[str, Any]:
    """Everything `usv status` shows, as plain data (also the build's Prefect table artifact)."""
    root = resolve_root(root)
    build = last_build(root)
    cfg = BuildConfig.model_validate({**build["config"], "output": root}) if build else None
    manifest_url = manifest_url or (cfg.manifest if cfg else None)
    manifest = load_manifest(manifest_url) if manifest_url else None
    ids = {r.video_id for r in manifest.rows} if manifest else None
    ledger = Ledger(root)
    latest = ledger.latest().to_pylist()
    if ids is not None:
        latest = [r for r in latest if r["video_id"] in ids]
    done = _done(cfg, manifest) if cfg and manifest else None
    slow = _slowest(ledger, ids, slowest)
    names = [INGEST, *load_stage_names(cfg)] if cfg else sorted({r["stage"] for r in latest})
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in latest:
        by_stage[r["stage"]].append(r)
    stages: dict[str, Any] = {}
    for name in names + sorted(set(by_stage) - set(names)):
        rows = by_stage.get(name, [])
        counts = Counter(f"error:{r['error_kind']}" if r["status"] == "error" else r["status"] for r in rows)
        errors: dict[str, Any] = {}
        for r in sorted((r for r in rows if r["status"] == "error"), key=lambda r: r["video_id"]):
            e = errors.setdefault(r["error_kind"], {"count": 0, "videos": [], "message": r["message"]})
            e["count"] += 1
            e["videos"].append(r["video_id"])
        ran = slow.get(name, [])[:slowest]
        failed = {r["video_id"] for r in rows if r["status"] == "error"}
        if done is not None and name in done:
            failed -= done[name]
            pending = sorted(ids - done[name] - failed) if ids is not None else []
        else:  # no settings to compare with: pending = no ok/cached latest row
            good = {r["video_id"] for r in rows if r["status"] != "error"}
            pending = sorted(ids - good - failed) if ids is not None else []
        stages[name] = {
            "counts": dict(sorted(counts.items())),
            "done": len(done[name]) if done is not None and name in done else None,
            "failed": len(failed), "errors": errors, "pending": pending,
            "slowest": [{"video_id": r["video_id"], "seconds": round(r["seconds"], 3), "run_id": r["run_id"]}
                        for r in ran],
        }
    last_run = build["run_id"] if build else None
    run_counts: dict[str, Counter[str]] = defaultdict(Counter)
    if last_run:
        for r in ledger.table(last_run).to_pylist():
            run_counts[r["stage"]][f"error:{r['error_kind']}" if r["status"] == "error" else r["status"]] += 1
    return {"root": root, "manifest": manifest_url, "videos": len(ids) if ids is not None else None,
            "last_run": last_run, "last_run_counts": {s: dict(c) for s, c in run_counts.items()}, "stages": stages}


def _slowest(ledger: Ledger, ids: set[str] | None, n: int) -> dict[str, list[dict[str, Any]]]:
    """Per stage, the n videos whose work took longest in any run (a cached re-run takes 0 s)."""
    t = ledger.table()
    t = t.filter(pc.equal(t["status"], "ok")).sort_by([("seconds", "descending")])
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for r in t.select(["video_id", "stage", "seconds", "run_id"]).to_pylist():
        key = (r["stage"], r["video_id"])
        if len(out[r["stage"]]) < n and key not in seen and (ids is None or r["video_id"] in ids):
            seen.add(key)
            out[r["stage"]].append(r)
    return out


def load_stage_names(cfg: BuildConfig | None) -> list[str]:
    if cfg is None:
        return []
    try:
        return [s.name for s in load_stages(cfg)]
    except ConfigError:
        return list(cfg.stages)


def status_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: the last run's outcomes next to the root's current state."""
    rows = []
    for name, st in summary["stages"].items():
        run = summary["last_run_counts"].get(name, {})
        slow = st["slowest"][0] if st["slowest"] else None
        rows.append({
            "stage": name, "ran_ok": run.get("ok", 0), "cached": run.get("cached", 0),
            "errors_this_run": sum(v for k, v in run.items() if k.startswith("error:")),
            "done": st["done"], "failed": st["failed"], "pending": len(st["pending"]),
            "error_kinds": ", ".join(f"{k}: {e['count']}" for k, e in sorted(st["errors"].items())),
            "slowest": f"{slow['video_id']} ({slow['seconds']:.2f} s)" if slow else "",
        })
    return rows


def _print_status(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{summary['root']} — {summary['videos']} videos in the manifest, last run "
                        f"{summary['last_run']}")
    for col in ("stage", "done", "failed", "pending", "last run: ok / cached / errors", "slowest"):
        table.add_column(col)
    for row in status_table(summary):
        table.add_row(row["stage"], str(row["done"] if row["done"] is not None else "?"), str(row["failed"]),
                      str(row["pending"]), f"{row['ran_ok']} / {row['cached']} / {row['errors_this_run']}",
                      row["slowest"])
    console.print(table)
    for name, st in summary["stages"].items():
        for kind, e in st["errors"].items():
            more = f" … +{e['count'] - SHOWN}" if e["count"] > SHOWN else ""
            console.print(f"[bold]{name}[/] {kind} ×{e['count']}: {', '.join(e['videos'][:SHOWN])}{more}\n"
                          f"    e.g. {e['message']}")
        if st["pending"]:
            console.print(f"[bold]{name}[/] pending ×{len(st['pending'])}: {', '.join(st['pending'][:SHOWN])}")


def select_retry(summary: dict[str, Any], kinds: set[str], ids: set[str]) -> dict[str, set[str]]:
    """Per video, the stages to re-run: failed with a chosen kind (plus what failed because of
    them, `upstream`), or every unfinished stage of a chosen id."""
    chosen: dict[str, set[str]] = defaultdict(set)
    everything = [name for name in summary["stages"] if name != INGEST]
    for kind, e in summary["stages"].get(INGEST, {}).get("errors", {}).items():
        for vid in e["videos"]:
            if kind in kinds or vid in ids:
                chosen[vid].update(everything)
    for name, st in summary["stages"].items():
        if name == INGEST:
            continue
        for kind, e in st["errors"].items():
            for vid in e["videos"]:
                if kind in kinds or vid in ids:
                    chosen[vid].add(name)
        for vid in st["pending"]:
            if vid in ids:
                chosen[vid].add(name)
    for name, st in summary["stages"].items():
        for vid in st["errors"].get(ErrorKind.UPSTREAM.value, {}).get("videos", []):
            if vid in chosen:
                chosen[vid].add(name)
    return dict(chosen)


def retry(root: str, kinds: set[str], ids: set[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Re-run the chosen (video, stage) pairs with the last build's config, then re-pack."""
    root = resolve_root(root)
    build = last_build(root)
    if build is None:
        raise ConfigError(f"{root} has no previous build (state/build.json); run `usv build` first")
    unknown = kinds - {k.value for k in ErrorKind}
    if unknown:
        raise ConfigError(f"unknown error kinds {sorted(unknown)}; known: {', '.join(k.value for k in ErrorKind)}")
    cfg = BuildConfig.model_validate({**build["config"], "output": root})
    manifest = load_manifest(cfg.manifest)
    missing = ids - {r.video_id for r in manifest.rows}
    if missing:
        raise ConfigError(f"not in the manifest {cfg.manifest}: {', '.join(sorted(missing))}")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-retry-" + uuid.uuid4().hex[:6]
    with RootLock(root):
        chosen = select_retry(status_summary(root, cfg.manifest), kinds, ids)
        by_set: dict[tuple[str, ...], list[ManifestRow]] = defaultdict(list)
        for row in manifest.rows:
            if row.video_id in chosen:
                by_set[tuple(sorted(chosen[row.video_id]))].append(row)
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for stages, rows in by_set.items():
            deadlines = {**cfg.stage_timeout_s, **dict.fromkeys(stages, timeout_s)} if timeout_s else None
            sub = cfg.model_copy(update={"stages": list(stages), "stage_timeout_s": deadlines or cfg.stage_timeout_s})
            for i in range(0, len(rows), cfg.batch_size):
                for stage, c in process_batch(rows[i:i + cfg.batch_size], sub, run_id).counts.items():
                    counts[stage].update(c)
        packed = Packer(root, load_stages(cfg), cfg.pack).pack(manifest) if chosen else None
    return {"run_id": run_id, "retried": {v: sorted(s) for v, s in sorted(chosen.items())},
            "counts": {s: dict(c) for s, c in counts.items()},
            "samples": packed.samples if packed else None}


def _split(value: str | None) -> set[str]:
    return {v.strip() for v in value.split(",") if v.strip()} if value else set()


def status(
    output: Annotated[str, typer.Argument(help="output root (path or fsspec URL)")] = "data/out",
    manifest: Annotated[str | None, typer.Option(help="manifest to compare with (default: the last build's)")] = None,
    slowest: Annotated[int, typer.Option(help="slowest videos listed per stage")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON")] = False,
) -> None:
    """Per stage: done, failed (by error type, with ids and a message), pending, and the slowest videos."""
    summary = status_summary(output, manifest, slowest)
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
    else:
        _print_status(summary)


def retry_cmd(
    output: Annotated[str, typer.Argument(help="output root of an earlier build")],
    kinds: Annotated[str | None, typer.Option(help="error types to re-run, e.g. timeout,model")] = None,
    ids: Annotated[str | None, typer.Option(help="video ids to re-run (their unfinished stages)")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="per-video stage deadline for this retry")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-run only the chosen error types or ids, with the last build's config; then re-pack."""
    if not kinds and not ids:
        raise typer.BadParameter("choose what to retry: --kinds timeout,model and/or --ids a,b")
    result = retry(output, _split(kinds), _split(ids), timeout_s)
    if as_json:
        typer.echo(json.dumps(result, indent=1, default=str))
    else:
        typer.echo(f"retried {len(result['retried'])} videos (run {result['run_id']}): {result['counts']}; "
                   f"samples now {result['samples']}")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("retry")(retry_cmd)
