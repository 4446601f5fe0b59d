"""Video ids that are safe as WebDataset keys and file names.

WebDataset splits a member name at its first dot, and ids become file names in the feature
store, so an id may hold only letters, digits, `_` and `-`. An id that needed cleaning gets a
short hash of the raw id appended, so two different raw ids never map to the same clean id.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
MAX_LEN = 96


def sanitize_id(raw: str) -> str:
    """Return `raw` if already safe, else a cleaned form plus an 8-hex hash of `raw`."""
    raw = str(raw)
    if _SAFE.match(raw):
        return raw
    cleaned = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    cleaned = _UNSAFE_RUN.sub("_", cleaned).strip("_-")[:MAX_LEN] or "id"
    digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def stable_fraction(text: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by `text` and `seed`: deterministic splits and shuffles."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
