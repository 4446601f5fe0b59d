"""One writer per output root (decision 6), with a lock that survives a crashed holder.

The lock file names its holder (host, pid) and carries a heartbeat refreshed by a daemon
thread. It is stale, and may be taken over, when its holder's process is gone on this host or
its heartbeat is older than `stale_after_s` (a holder on another machine that died).
Local roots create the file with O_EXCL; object stores have no exclusive create, so there the
lock is advisory (checked, then written), which is documented in deploy/README.md.

Taking over a stale lock also sweeps the dead holder's temp files (`.tmp-*`, never read as
data, see storage/atomic.py): nobody else can be writing them while we hold the root.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from storage.atomic import TMP_PREFIX, filesystem, is_local, join, read_json, remove, write_json

LOCK_NAME = ".usv.lock"


class LockedError(RuntimeError):
    """Another live build holds the output root."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(root: str) -> int:
    """Delete temp files a killed writer left under a local root; object stores have none
    (a PUT is whole, and local staging files live in TMPDIR). Returns how many were removed."""
    if not is_local(root):
        return 0
    removed = 0
    for folder, _dirs, files in os.walk(filesystem(root)[1]):
        for name in files:
            if name.startswith(TMP_PREFIX):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


class RootLock:
    """Context manager: `with RootLock(root): ...` refuses a second writer on `root`."""

    def __init__(self, root: str, stale_after_s: float = 600.0, heartbeat_s: float = 30.0) -> None:
        self.url = join(root, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swept = 0  # temp files of a crashed holder removed on takeover

    def _record(self) -> dict[str, object]:
        return {**self.me, "heartbeat": time.time()}

    def holder(self) -> dict[str, object] | None:
        try:
            return read_json(self.url)
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def _is_stale(self, holder: dict[str, object]) -> bool:
        if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", -1))):  # type: ignore[arg-type]
            return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s  # type: ignore[arg-type]

    def _try_create(self) -> bool:
        if not is_local(self.url):
            if self.holder() is not None:
                return False
            write_json(self.url, self._record())
            return True
        path = Path(filesystem(self.url)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record(), fh)
        return True

    def acquire(self) -> None:
        if not self._try_create():
            holder = self.holder()
            if holder is not None and not self._is_stale(holder):
                raise LockedError(
                    f"output root is in use by another build (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}); wait for it to finish, or delete {self.url} if that "
                    "process is gone"
                )
            remove(self.url)  # stale: its holder crashed
            if not self._try_create():
                raise LockedError(f"lost the race for {self.url} to another build")
            self.swept = sweep_partials(self.url.rsplit("/", 1)[0])
        self._thread = threading.Thread(target=self._beat, daemon=True, name="usv-lock-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            write_json(self.url, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        holder = self.holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            remove(self.url)

    def __enter__(self) -> RootLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
