"""The ledger (decision 3): one row per (video, stage, attempt), so nothing fails silently.

Each batch appends its rows as a new Parquet part file (`ledger/<run_id>/<part>.parquet`),
written atomically: concurrent batches never contend for one file, and a killed batch loses
at most its unflushed rows, never a committed one. Readers see the union of the parts.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import filesystem, join, write_bytes

STATUSES = ("ok", "cached", "error")

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("video_id", pa.string()), ("stage", pa.string()), ("key", pa.string()),
    ("status", pa.string()), ("error_kind", pa.string()), ("message", pa.string()),
    ("attempt", pa.int32()), ("seconds", pa.float64()), ("finished_at", pa.float64()),
])


@dataclass
class LedgerRow:
    run_id: str
    video_id: str
    stage: str
    key: str
    status: str
    error_kind: str = ""
    message: str = ""
    attempt: int = 1
    seconds: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown ledger status {self.status!r}")
        self.finished_at = self.finished_at or time.time()


class Ledger:
    def __init__(self, root: str) -> None:
        self.root = join(root, "ledger")

    def append(self, rows: list[LedgerRow]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(join(self.root, rows[0].run_id, f"{uuid.uuid4().hex}.parquet"), buf.getvalue())

    def table(self, run_id: str | None = None) -> pa.Table:
        fs, path = filesystem(self.root if run_id is None else join(self.root, run_id))
        try:
            files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/.tmp-" not in p)
        except FileNotFoundError:
            files = []
        if not files:
            return SCHEMA.empty_table()
        return pa.concat_tables(pq.read_table(f, filesystem=fs, schema=SCHEMA) for f in files)

    def latest(self) -> pa.Table:
        """The newest row per (video, stage): what is true now."""
        t = self.table()
        if t.num_rows == 0:
            return t
        t = t.sort_by([("finished_at", "descending")])
        keys = pc.binary_join_element_wise(t["video_id"], t["stage"], "\x00").to_pylist()
        seen: set[str] = set()
        keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]  # type: ignore[func-returns-value]
        return t.take(keep)

    def error_attempts(self) -> dict[tuple[str, str, str], int]:
        """Failed attempts so far per (video, stage, key): the attempt number of the next try."""
        t = self.table()
        out: dict[tuple[str, str, str], int] = {}
        for v, s, k, st in zip(t["video_id"].to_pylist(), t["stage"].to_pylist(), t["key"].to_pylist(),
                               t["status"].to_pylist(), strict=True):
            if st == "error":
                out[(v, s, k)] = out.get((v, s, k), 0) + 1
        return out
