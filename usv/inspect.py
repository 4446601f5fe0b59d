"""`usv inspect ROOT VIDEO_ID`: everything known about one video, in the terminal or as HTML.

The sample is read from its shard (the product users train on); a video that never reached
a shard is read from the feature store, stage by stage, using the keys in the ledger. The
ledger rows come along, so a failure is explained next to whatever did succeed.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Annotated, Any

import numpy as np
import typer

from storage.atomic import exists, filesystem, join, read_json
from storage.feature_store import FeatureStore
from storage.ledger import Ledger
from usv.report import read_table, resolve_root

JSON_MEMBERS = ("meta.json", "ocr.json", "asr.json", "diar.json", "frames.json", "text.json", "clip.json")


def _from_shard(root: str, shard: str, video_id: str) -> dict[str, bytes]:
    fs, path = filesystem(join(root, "shards", shard))
    out: dict[str, bytes] = {}
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            if key == video_id and info.isfile():
                out[member] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return out


def _from_store(root: str, video_id: str, ledger: list[dict[str, Any]], stages: dict[str, str]) -> dict[str, bytes]:
    """Members of the stages whose newest ok/cached ledger row names a stored key."""
    store, out = FeatureStore(root), {}
    for row in sorted(ledger, key=lambda r: r["finished_at"]):
        fp = stages.get(row["stage"])
        if fp and row["status"] in ("ok", "cached") and exists(store.url(row["stage"], fp, video_id, row["key"])):
            out.update(store.read(row["stage"], fp, video_id, row["key"]))
    return out


def array_summary(name: str, data: bytes, fields: list[str] | None = None) -> dict[str, Any]:
    """Shape and value range of an array member; row L2 norms for embeddings (not for mel)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    f = arr.astype(np.float32)
    out: dict[str, Any] = {"member": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                           "finite": bool(np.isfinite(f).all())}
    if f.size:
        out.update(min=round(float(np.nanmin(f)), 4), mean=round(float(np.nanmean(f)), 4),
                   max=round(float(np.nanmax(f)), 4))
    if f.ndim == 2 and not name.startswith("mel"):
        norms = np.linalg.norm(f, axis=1)
        out["row_norms"] = {(fields[i] if fields and i < len(fields) else str(i)): round(float(n), 4)
                            for i, n in enumerate(norms)} if len(norms) <= 8 else {
            "min": round(float(norms.min()), 4), "mean": round(float(norms.mean()), 4),
            "max": round(float(norms.max()), 4)}
    return out


def gather(root: str, video_id: str) -> dict[str, Any]:
    """The video's table row, ledger rows and sample members (JSON parsed, arrays summarised)."""
    root = resolve_root(root)
    videos = read_table(root, "videos") or []
    row = next((v for v in videos if v["video_id"] == video_id), None)
    if row is None:
        near = [v["video_id"] for v in videos if video_id.lower() in v["video_id"].lower()][:10]
        raise typer.BadParameter(f"{video_id!r} is not in {root}/tables/videos.parquet"
                                 + (f"; similar: {', '.join(near)}" if near else ""))
    t = Ledger(root).table()
    ledger = sorted((r for r in t.to_pylist() if r["video_id"] == video_id), key=lambda r: r["finished_at"])
    index_url = join(root, "shards", "index.json")
    stages = read_json(index_url).get("stages", {}) if exists(index_url) else {}
    if row.get("shard"):
        members, source = _from_shard(root, row["shard"], video_id), f"shard {row['shard']}"
    else:
        members, source = _from_store(root, video_id, ledger, stages), "feature store (not in any shard)"
    docs = {m: json.loads(members[m]) for m in JSON_MEMBERS if m in members}
    text_fields = docs.get("text.json", {}).get("fields")
    arrays = [array_summary(m, b, text_fields if m == "text.npy" else None)
              for m, b in sorted(members.items()) if m.endswith(".npy")]
    frames = sorted(m for m in members if m.startswith("frame") and m.endswith(".jpg"))
    return {"video": row, "ledger": ledger, "source": source, "members": sorted(members), "docs": docs,
            "arrays": arrays, "frame_members": frames, "_bytes": members}


def transcript(info: dict[str, Any]) -> list[dict[str, Any]]:
    """ASR segments with speakers; without ASR, the diarization turns (speaker and times only)."""
    docs = info["docs"]
    if "asr.json" in docs:
        return [{k: s.get(k) for k in ("start", "end", "speaker", "text")} for s in docs["asr.json"]["segments"]]
    if "diar.json" in docs:
        return [{"start": t["start"], "end": t["end"], "speaker": t["speaker"], "text": ""}
                for t in docs["diar.json"]["turns"]]
    return []


def subtitle_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    return list(info["docs"].get("ocr.json", {}).get("subtitle_lines", []))


def draw_frames(info: dict[str, Any], limit: int = 60) -> list[tuple[float | None, bytes]]:
    """Frame JPEGs with the OCR boxes of the same second drawn on (green: text, orange: watermark)."""
    from PIL import Image, ImageDraw

    times = info["docs"].get("frames.json", {}).get("times", [])
    ocr = {round(f["t"], 3): f["lines"] for f in info["docs"].get("ocr.json", {}).get("frames", [])}
    src_w = info["docs"].get("meta.json", {}).get("width") or info["video"].get("probe_width")
    out = []
    for i, name in enumerate(info["frame_members"][:limit]):
        img = Image.open(io.BytesIO(info["_bytes"][name])).convert("RGB")
        t = times[i] if i < len(times) else None
        scale = img.width / src_w if src_w else 1.0
        draw = ImageDraw.Draw(img)
        for line in ocr.get(round(t, 3), []) if t is not None else []:
            pts = [(x * scale, y * scale) for x, y in line["box"]]
            color = (255, 140, 0) if line.get("watermark") else (0, 200, 0)
            draw.polygon(pts, outline=color, width=2)
            draw.text((pts[0][0], max(0.0, pts[0][1] - 11)), line["text"][:40], fill=color)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append((t, buf.getvalue()))
    return out


def render_html(info: dict[str, Any], limit: int = 60) -> str:
    from usv.report_html import esc, img, kv_table, page, table

    v = info["video"]
    body = [f"<p>read from {esc(info['source'])}; members: {esc(info['members'])}</p>",
            "<h2>Metadata</h2>", kv_table(v, "meta"),
            "<h2>Ledger</h2>",
            table(["run_id", "stage", "status", "error_kind", "message", "attempt", "seconds", "key"],
                  info["ledger"], "ledger"),
            "<h2>Subtitle (OCR)</h2>", table(["start", "end", "text"], subtitle_rows(info), "subtitle"),
            "<h2>Transcript</h2>", table(["start", "end", "speaker", "text"], transcript(info), "transcript"),
            "<h2>Arrays and embedding norms</h2>",
            table(["member", "shape", "dtype", "finite", "min", "mean", "max", "row_norms"], info["arrays"], "arrays"),
            "<h2>Frames with OCR boxes</h2>", '<div class="plots">']
    for t, png in draw_frames(info, limit):
        body.append(f"<figure>{img(png, f'frame at {t}s')}<figcaption>t = {esc(t)} s</figcaption></figure>")
    body.append("</div>")
    return page(f"video {v['video_id']}", "".join(body))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_text(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def show(title: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        tab = Table(*columns, title=title, title_justify="left")
        for r in rows:
            tab.add_row(*(_fmt(r.get(c)) for c in columns))
        console.print(tab if rows else f"[bold]{title}[/bold]: none")

    v = info["video"]
    show(f"{v['video_id']} ({info['source']})", ["field", "value"],
         [{"field": k, "value": val} for k, val in v.items()])
    show("ledger", ["stage", "status", "error_kind", "message", "attempt", "seconds"], info["ledger"])
    show("subtitle (OCR)", ["start", "end", "text"], subtitle_rows(info))
    show("transcript", ["start", "end", "speaker", "text"], transcript(info))
    show("arrays", ["member", "shape", "dtype", "min", "mean", "max", "row_norms"], info["arrays"])
    console.print(f"frames: {len(info['frame_members'])} (use --html to see them with OCR boxes)")


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        root: Annotated[str, typer.Argument(help="output root of a build")],
        video_id: Annotated[str, typer.Argument(help="the video's (sanitised) id")],
        html: Annotated[str | None, typer.Option(help="also write an HTML page with the frames")] = None,
        frames: Annotated[int, typer.Option(help="at most this many frames in the HTML page")] = 60,
        as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no terminal tables")] = False,
    ) -> None:
        """Show everything known about one video: metadata, ledger, subtitle, transcript, arrays, frames."""
        info = gather(root, video_id)
        if as_json:
            typer.echo(json.dumps({k: v for k, v in info.items() if k != "_bytes"}, indent=1, default=str))
        elif not quiet:
            print_text(info)
        if html:
            from storage.atomic import write_bytes

            write_bytes(html, render_html(info, frames).encode())
            if not as_json:
                typer.echo(f"wrote {html}")
