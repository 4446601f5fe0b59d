"""From per-frame OCR lines to a video subtitle: the paper's post-processing (section 3.1).

Pure functions on plain data, no model: (1) pieces of one text row that the detector split
are joined; (2) watermarks — text that stays at about the same place through most of the
video — are marked and kept out of the subtitle; (3) each subtitle line is carried to the
adjacent sampled frames, so a frame where OCR missed it does not split it in two, and repeats
over consecutive frames merge into one `{start, end, text}`; (4) the subtitle is the lines in
time order. Texts are compared by `norm()` (case, spaces and punctuation ignored), because
OCR often drops the spaces between words and reads "USV SYNTH" as "USV.SYNTH".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

Box = list[list[float]]  # four [x, y] corners, clockwise from top-left


def norm(text: str) -> str:
    """Text as compared: casefolded letters and digits only (any script)."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def similar(a: str, b: str, threshold: float) -> bool:
    """Normalised texts equal, or close enough to be one line misread in a few characters."""
    return a == b or (bool(a) and bool(b) and SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold)


def _bounds(box: Box) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in box], [p[1] for p in box]
    return min(xs), min(ys), max(xs), max(ys)


def _center(box: Box) -> tuple[float, float]:
    x0, y0, x1, y1 = _bounds(box)
    return (x0 + x1) / 2, (y0 + y1) / 2


def join_rows(lines: list[dict[str, Any]], gap: float = 1.5) -> list[dict[str, Any]]:
    """Join boxes on one text row (vertical overlap ≥ half a height, horizontal gap < `gap`
    heights) into one line, left to right; the detector sometimes splits a row in two."""
    rows: list[dict[str, Any]] = []
    for line in sorted(lines, key=lambda ln: _bounds(ln["box"])[0]):
        x0, y0, x1, y1 = _bounds(line["box"])
        for row in rows:
            rx0, ry0, rx1, ry1 = _bounds(row["box"])
            height = min(y1 - y0, ry1 - ry0)
            overlap = min(y1, ry1) - max(y0, ry0)
            if height > 0 and overlap >= 0.5 * height and x0 - rx1 < gap * height:
                n = len(row["text"]) + len(line["text"])
                row["conf"] = (row["conf"] * len(row["text"]) + line["conf"] * len(line["text"])) / max(1, n)
                row["text"] = f"{row['text']} {line['text']}"
                nx0, ny0, nx1, ny1 = min(rx0, x0), min(ry0, y0), max(rx1, x1), max(ry1, y1)
                row["box"] = [[nx0, ny0], [nx1, ny0], [nx1, ny1], [nx0, ny1]]
                break
        else:
            rows.append(dict(line))
    return sorted(rows, key=lambda ln: (_bounds(ln["box"])[1], _bounds(ln["box"])[0]))


def _corners(b: list[float]) -> Box:
    return [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]]


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    ax0, ay0, ax1, ay1 = _bounds(a)
    bx0, by0, bx1, by1 = _bounds(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    small = min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
    return inter / small if small > 0 else 0.0


def _same_text(a: str, b: str, threshold: float) -> bool:
    """Similar, or one a part of the other (the detector cut a box, or missed a letter)."""
    return similar(a, b, threshold) or (min(len(a), len(b)) > 1 and (a in b or b in a))


def mark_watermarks(frames: list[dict[str, Any]], width: float, height: float, min_fraction: float = 0.5,
                    min_frames: int = 3, max_shift: float = 0.03, similarity: float = 0.85) -> list[str]:
    """Set `watermark` on every line that is a watermark; return the watermark texts.

    Lines are grouped by place (box at least half inside the group's box) and text
    (similar, or a part of it: OCR reads a watermark on a busy background differently from
    frame to frame). A group seen in ≥ `min_fraction` of the frames (and ≥ `min_frames`)
    whose box centre never moves more than `max_shift` of the frame size is a watermark.
    """
    groups: list[tuple[list[float], str, list[tuple[int, dict[str, Any]]]]] = []  # union box, first text, hits
    for i, frame in enumerate(frames):
        for line in frame["lines"]:
            line["watermark"] = False
            key = norm(line["text"])
            group = next((g for g in groups if _overlap(_corners(g[0]), line["box"]) >= 0.5
                          and _same_text(g[1], key, similarity)), None)
            if group is None:
                groups.append((list(_bounds(line["box"])), key, [(i, line)]))
                continue
            x0, y0, x1, y1 = _bounds(line["box"])
            group[0][:] = [min(group[0][0], x0), min(group[0][1], y0), max(group[0][2], x1), max(group[0][3], y1)]
            group[2].append((i, line))
    texts: list[str] = []
    for box, _, hits in groups:
        if len({i for i, _ in hits}) < max(min_frames, min_fraction * len(frames)):
            continue
        variants = Counter(norm(ln["text"]) for _, ln in hits)
        key = max(variants, key=lambda k: (variants[k], len(k), k))
        centres = [_center(ln["box"]) for _, ln in hits if norm(ln["text"]) == key]
        mx, my = sorted(c[0] for c in centres)[len(centres) // 2], sorted(c[1] for c in centres)[len(centres) // 2]
        if any(abs(x - mx) > max_shift * width or abs(y - my) > max_shift * height for x, y in centres):
            continue
        for frame in frames:  # all its readings, also those that started a group of their own
            for ln in frame["lines"]:
                if _overlap(_corners(box), ln["box"]) >= 0.5 and _same_text(key, norm(ln["text"]), similarity):
                    ln["watermark"] = True
        readings = Counter(ln["text"] for _, ln in hits if norm(ln["text"]) == key)
        texts.append(max(readings, key=lambda t: (len(t.split()), readings[t], t)))
    return sorted(texts)


@dataclass
class _Track:
    """One subtitle line followed over consecutive sampled frames."""

    first: int
    last: int
    y: float
    x: float
    key: str
    variants: Counter[str] = field(default_factory=Counter)
    conf: dict[str, float] = field(default_factory=dict)

    def add(self, i: int, line: dict[str, Any]) -> None:
        self.last = i
        self.key = norm(line["text"])
        self.variants[line["text"]] += 1
        self.conf[line["text"]] = max(self.conf.get(line["text"], 0.0), float(line["conf"]))

    def text(self) -> str:
        """The most frequent reading, then the one with most words (OCR drops spaces more often
        than it adds them), then the most confident, then the smallest string (deterministic)."""
        return min(self.variants, key=lambda t: (-self.variants[t], -len(t.split()), -self.conf[t], t))


def subtitle_lines(frames: list[dict[str, Any]], times: list[float], interval: float, max_gap: int = 2,
                   similarity: float = 0.75) -> list[dict[str, Any]]:
    """Merge the non-watermark lines of consecutive frames into `{start, end, text}` in time order.

    A line continues a track with a similar text last seen at most `max_gap` frames earlier
    (so it is carried over the frames between); each sampled frame stands for `interval`
    seconds from its time.
    """
    open_tracks: list[_Track] = []
    done: list[_Track] = []
    for i, frame in enumerate(frames):
        still = []
        for track in open_tracks:
            (still if i - track.last <= max_gap else done).append(track)
        open_tracks = still
        used: set[int] = set()
        for line in frame["lines"]:
            key = norm(line["text"])
            if line.get("watermark") or not key:
                continue
            match = next((k for k, tr in enumerate(open_tracks)
                          if k not in used and tr.last < i and similar(tr.key, key, similarity)), None)
            if match is None:
                cx, cy = _center(line["box"])
                open_tracks.append(_Track(i, i, cy, cx, key))
                match = len(open_tracks) - 1
            used.add(match)
            open_tracks[match].add(i, line)
    done.extend(open_tracks)
    done.sort(key=lambda tr: (tr.first, tr.y, tr.x))
    return [{"start": round(times[tr.first], 3), "end": round(times[tr.last] + interval, 3), "text": tr.text()}
            for tr in done]
