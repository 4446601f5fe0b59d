"""Read and validate a manifest (CSV, JSONL or Parquet) of videos and their labels.

Every problem names the file, the row (1-based, counting the header as row 1 in CSV) and the
column, and all problems are reported at once. Duplicate ids: the first row wins, the later
ones are returned in `Manifest.duplicates` and reported by the build.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from storage.atomic import filesystem, is_local, read_bytes
from storage.ids import sanitize_id
from usv.errors import ConfigError

REQUIRED = ("video_id", "source", "title", "topic")
OPTIONAL = ("macro_topic", "split", "creator", "language")
SPLITS = ("train", "val", "test")


class ManifestRow(BaseModel):
    """One video as the user described it; `video_id` is already sanitised."""

    model_config = ConfigDict(frozen=True)

    video_id: str
    raw_id: str
    source: str
    title: str
    topic: str
    macro_topic: str = ""
    split: str = ""
    creator: str = ""
    language: str = ""
    row: int = 0


@dataclass(frozen=True)
class Problem:
    file: str
    row: int
    column: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}, column '{self.column}': {self.message}"


class ManifestError(ConfigError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"manifest has {len(problems)} problem(s):\n  {shown}{more}")


@dataclass
class Manifest:
    url: str
    rows: list[ManifestRow]
    duplicates: list[ManifestRow] = field(default_factory=list)

    def by_id(self) -> dict[str, ManifestRow]:
        return {r.video_id: r for r in self.rows}


def _records(url: str) -> tuple[list[dict[str, object]], list[str], int]:
    """Raw records, the column names, and the row number of the first record."""
    data = read_bytes(url)
    lower = url.lower()
    if lower.endswith((".parquet", ".pq")):
        table = pq.read_table(io.BytesIO(data))
        return table.to_pylist(), table.column_names, 1
    if lower.endswith((".jsonl", ".ndjson")):
        records: list[dict[str, object]] = []
        for i, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError([Problem(url, i, "*", f"not valid JSON: {exc.msg}")]) from exc
            if not isinstance(obj, dict):
                raise ManifestError([Problem(url, i, "*", "each line must be a JSON object")])
            records.append(obj)
        cols = sorted({k for r in records for k in r})
        return records, cols, 1
    if lower.endswith((".csv", ".tsv")):
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ",")
        return list(reader), list(reader.fieldnames or []), 2
    raise ManifestError([Problem(url, 0, "*", "unknown format: use .csv, .tsv, .jsonl or .parquet")])


def _resolve_source(source: str, manifest_url: str) -> str:
    """Relative sources are relative to the manifest's folder."""
    if "://" in source or source.startswith("/"):
        return source
    base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
    if is_local(manifest_url):
        return str((Path(filesystem(manifest_url)[1]).parent / source).resolve())
    return f"{base}/{source}"


def load_manifest(url: str) -> Manifest:
    try:
        records, columns, first_row = _records(url)
    except FileNotFoundError as exc:
        raise ManifestError([Problem(url, 0, "*", "file not found")]) from exc
    problems = [Problem(url, 1, c, "required column is missing") for c in REQUIRED if c not in columns]
    if problems:
        raise ManifestError(problems)
    rows: list[ManifestRow] = []
    duplicates: list[ManifestRow] = []
    seen: set[str] = set()
    for offset, rec in enumerate(records):
        n = first_row + offset
        values = {k: "" if rec.get(k) is None else str(rec.get(k)).strip() for k in REQUIRED + OPTIONAL}
        row_problems = [Problem(url, n, c, "is empty") for c in ("video_id", "source", "topic") if not values[c]]
        if values["split"] and values["split"] not in SPLITS:
            row_problems.append(Problem(url, n, "split", f"'{values['split']}' is not one of {', '.join(SPLITS)}"))
        if row_problems:
            problems.extend(row_problems)
            continue
        raw_id = values.pop("video_id")
        row = ManifestRow(
            video_id=sanitize_id(raw_id),
            raw_id=raw_id,
            row=n,
            **{**values, "source": _resolve_source(values["source"], url)},
        )
        if row.video_id in seen:
            duplicates.append(row)
            continue
        seen.add(row.video_id)
        rows.append(row)
    if problems:
        raise ManifestError(problems)
    if not rows:
        raise ManifestError([Problem(url, first_row, "*", "manifest has no rows")])
    return Manifest(url=url, rows=rows, duplicates=duplicates)
