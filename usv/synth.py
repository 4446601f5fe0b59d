"""Deterministic synthetic corpus: short videos whose subtitles, speech and topic are known exactly.

Real user videos come without ground truth, so tests of OCR (CER), ASR (WER), diarization
(speaker count) and topic fusion run on videos made here with the real `ffmpeg` CLI and
`espeak-ng`. The same `seed` gives byte-identical mp4, manifest and truth files.

Factor rule (why fusion must beat every single modality): topic `t` of `T` carries three
factors, each seen by one modality only, so that no factor alone names the topic but any two do.
With `E = T` rounded down to even:

* `visual_group = t // 2`        background pattern  -> pairs {0,1} {2,3} ...
* `audio_group  = t % 2`         voice pair, pitch and spoken vocabulary -> evens / odds
* `text_group   = ((t+1) % E) // 2`  subtitle vocabulary -> pairs {0,E-1} {1,2} {3,4} ...

For even `T >= 4` every group holds at least two topics and any two groups meet in at most
one topic. No partition of 3 or 5 topics can do that, so for odd `T` the last topic gets a
visual group of its own (visual alone names it) with `audio_group 0` and `text_group 0`
(so audio + text confuse it with topic 0); for `T = 2` only audio separates the topics.
Beyond 16 topics subtitle vocabularies repeat (8 text groups), which blurs those groups;
background patterns repeat with a rotated hue (8 patterns per 47 degrees of hue).
The title names the topic and repeats a subtitle noun and a spoken noun (for retrieval).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tempfile
import wave
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
WATERMARK = "USV SYNTH"
FPS = 25
SPEECH_RATE = 22050  # espeak-ng's native rate; the mp4 carries 16 kHz AAC
COLUMNS = ("video_id", "source", "title", "topic", "macro_topic", "split", "creator", "language")
_BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
             "-map_metadata", "-1", "-threads", "1", "-filter_threads", "1",
             "-filter_complex_threads", "1"]
_TOPICS = (("cooking", "lifestyle"), ("fitness", "sports"), ("travel", "lifestyle"),
           ("pets", "animals"), ("gaming", "entertainment"), ("music", "entertainment"),
           ("fashion", "lifestyle"), ("cars", "vehicles"), ("gardening", "home"),
           ("science", "education"), ("comedy", "entertainment"), ("dance", "entertainment"))


class MissingToolError(RuntimeError):
    """A system tool the generator shells out to is not installed."""


@dataclass(frozen=True)
class Theme:
    """Words of one vocabulary; templates combine them into plain ASCII lines."""

    nouns: tuple[str, ...]
    adjs: tuple[str, ...]
    verbs: tuple[str, ...]


def _theme(nouns: str, adjs: str, verbs: str) -> Theme:
    return Theme(tuple(nouns.split()), tuple(adjs.split()), tuple(verbs.split()))


TEXT_THEMES = (  # subtitles, indexed by text_group
    _theme("tomato basil pepper lemon garlic onion carrot herbs",
           "fresh green ripe sweet crisp bright", "pick chop wash slice"),
    _theme("boat shell wave beach harbor island sailor anchor",
           "blue salty calm wild sandy windy", "sail swim paint find"),
    _theme("street bridge tower market subway corner taxi window",
           "busy noisy tall modern quiet crowded", "cross visit watch photograph"),
    _theme("river cabin trail pine moss fox owl meadow",
           "misty dark hidden wooden mossy cold", "climb follow explore build"),
    _theme("snow scarf sled candle blanket cocoa fireplace mitten",
           "frozen warm cozy white soft icy", "knit light wrap carry"),
    _theme("rocket planet comet moon star orbit crater galaxy",
           "distant silver huge strange shiny lunar", "launch spot track circle"),
    _theme("barn tractor wheat horse chicken fence apple pumpkin",
           "muddy yellow early rusty tiny round", "plant feed harvest fix"),
    _theme("pencil notebook lesson chalk backpack teacher puzzle paper",
           "simple clever neat quick tricky blank", "write solve draw check"),
)
SPEECH_THEMES = (  # spoken words, indexed by audio_group
    _theme("rain cloud storm sunshine thunder breeze forecast rainbow",
           "heavy gentle sunny pleasant humid frosty", "expect notice avoid measure"),
    _theme("hammer table engine wheel bottle ladder shovel rope",
           "broken metal rough sturdy dusty polished", "repair clean polish open"),
    _theme("kettle spoon bread butter oven honey coffee plate",
           "hot crunchy sticky golden toasted spicy", "bake stir pour taste"),
    _theme("ticket station suitcase airport map hotel passport train",
           "late cheap long empty small strict", "book pack catch miss"),
)
_TEMPLATES = ("{a} {n} and {m}", "we {v} the {a} {n}", "{v} the {n} today", "the {n} looks {a}",
              "my {a} {n} is ready", "so much {a} {n} here", "try this {a} {n} now",
              "{v} {a} {n} with {m}", "the best {n} ever", "look at that {a} {n}")
_TAILS = ("tonight", "vlog", "tips", "today", "day one", "at home", "challenge", "highlights")
# (espeak voice, pitch, speed) pairs, indexed by audio_group: the two speakers of a video
VOICES = ((("en-us+m3", 35, 145), ("en-us+f3", 72, 155)),
          (("en-us+m7", 50, 138), ("en-us+f4", 82, 150)),
          (("en-us+m1", 45, 150), ("en-us+f2", 62, 160)),
          (("en-gb+m5", 28, 142), ("en-gb+f1", 80, 152)))


@dataclass(frozen=True)
class Factors:
    """The three per-modality factors of one topic (see the module docstring)."""

    visual_group: int
    audio_group: int
    text_group: int


def topic_factors(t: int, topics: int) -> Factors:
    """Factor groups of topic `t` out of `topics`, by the rule in the module docstring."""
    even = topics - topics % 2
    if t >= even:  # the odd one out
        return Factors(even // 2, 0, 0)
    return Factors(t // 2, t % 2, ((t + 1) % even) // 2)


def topic_name(t: int) -> tuple[str, str]:
    """(topic, macro_topic) of topic `t`; beyond the fixed list names get a round number."""
    name, macro = _TOPICS[t % len(_TOPICS)]
    return (name if t < len(_TOPICS) else f"{name}{t // len(_TOPICS) + 1}"), macro


def _check_tools() -> None:
    """Fail early, naming the apt package that provides what is missing."""
    for tool, pkg in (("ffmpeg", "ffmpeg"), ("ffprobe", "ffmpeg"), ("espeak-ng", "espeak-ng")):
        if shutil.which(tool) is None:
            raise MissingToolError(f"`{tool}` not found on PATH: apt-get install {pkg}")
    if not FONT.is_file():
        raise MissingToolError(f"font {FONT} not found: apt-get install fonts-dejavu-core")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


def _line(rng: random.Random, theme: Theme, max_chars: int) -> tuple[str, str]:
    """A 3-6 word line from `theme` no longer than `max_chars`, and its main noun."""
    while True:
        n, m = rng.sample(theme.nouns, 2)
        text = rng.choice(_TEMPLATES).format(a=rng.choice(theme.adjs), v=rng.choice(theme.verbs), n=n, m=m)
        if len(text) <= max_chars:
            return text, n


def _subtitles(rng: random.Random, seconds: float, theme: Theme, max_chars: int) -> list[dict]:
    """2-3 consecutive lines (1 if `seconds` < 4.4), each on screen for at least 2 s."""
    gap, lead = 0.2, 0.2
    count = max(1, min(3, int((seconds - lead + gap) // (2.0 + gap))))
    slack = seconds - lead - count * 2.0 - (count - 1) * gap
    extra = [rng.random() for _ in range(count)]
    start, out = lead, []
    for k in range(count):
        end = round(start + 2.0 + slack * extra[k] / (sum(extra) + 1.0), 2)
        text, noun = _line(rng, theme, max_chars)
        out.append({"start": start, "end": end, "text": text, "noun": noun})
        start = round(end + gap, 2)
    return out


def _espeak(text: str, voice: tuple[str, int, int], path: Path) -> array:
    """Speak `text`; return its samples with silence trimmed to 20 ms on either side."""
    name, pitch, speed = voice
    _run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(path), text])
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SPEECH_RATE, 1, 2):
            raise RuntimeError(f"espeak-ng wrote an unexpected WAV format for voice {name}")
        samples = array("h", w.readframes(w.getnframes()))
    loud = [i for i, s in enumerate(samples) if abs(s) > 64]
    if not loud:
        raise RuntimeError(f"espeak-ng produced silence for {text!r}")
    pad = SPEECH_RATE // 50  # keep 20 ms around the audible span so onsets stay intact
    return samples[max(0, loud[0] - pad): loud[-1] + 1 + pad]


def _speech(rng: random.Random, seconds: float, group: int, tmp: Path) -> tuple[list[dict], array]:
    """Non-overlapping turns of one or two voices, and the mono track that holds them."""
    voices, theme = VOICES[group % len(VOICES)], SPEECH_THEMES[group % len(SPEECH_THEMES)]
    speakers = 1 if rng.random() < 0.17 else 2
    track = array("h", bytes(2 * round(seconds * SPEECH_RATE)))
    turns: list[dict] = []
    t, tries = rng.uniform(0.2, 0.6), 0
    while len(turns) < 4 and tries < 4:
        k = len(turns) % speakers
        text, noun = _line(rng, theme, 60)
        samples = _espeak(text, voices[k], tmp / f"turn{len(turns)}-{tries}.wav")
        start = round(t * SPEECH_RATE)
        if start + len(samples) > round((seconds - 0.15) * SPEECH_RATE):
            tries += 1
            if len(turns) >= speakers:
                break
            continue
        track[start: start + len(samples)] = samples
        name, pitch, speed = voices[k]
        turns.append({"start": round(start / SPEECH_RATE, 3), "end": round((start + len(samples)) / SPEECH_RATE, 3),
                      "text": text, "speaker": f"a{group}s{k}", "voice": name, "pitch": pitch, "speed": speed,
                      "noun": noun})
        t = (start + len(samples)) / SPEECH_RATE + rng.uniform(0.35, 0.8)
    if not turns:
        raise ValueError(f"no sentence fits in {seconds} s of speech")
    return turns, track


def _write_wav(path: Path, samples: array) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SPEECH_RATE)
        w.writeframes(samples.tobytes())


def _pattern(rng: random.Random, group: int, w: int, h: int) -> str:
    """The lavfi background of a visual group, with a small seeded per-video variation."""
    seed, lo = rng.randrange(1, 2**31), f"{max(16, w // 8)}x{max(16, h // 8)}"
    up, size = f"scale={w}:{h}:flags=neighbor", f"{w}x{h}"
    scroll = f"scroll=horizontal={rng.uniform(0.001, 0.004):.4f}"
    patterns = (
        f"testsrc2=s={w}x{2 * h}:r={FPS},crop={w}:{h}:0:{h}",
        f"gradients=s={size}:r={FPS}:c0=0x2040c0:c1=0xe05090:n=2:speed=0.02:seed={seed}",
        f"life=s={lo}:r={FPS}:mold=10:ratio=0.2:seed={seed}:life_color=#50e070:death_color=#204030,{up}",
        f"cellauto=s={lo}:r={FPS}:rule=110:seed={seed},{up},colorchannelmixer=gg=0.6:bb=0.15",
        f"mandelbrot=s={lo}:r={FPS}:maxiter=96:end_pts=200:start_scale={rng.uniform(2.5, 3.5):.3f},{up}",
        f"smptebars=s={size}:r={FPS},{scroll}",
        f"sierpinski=s={size}:r={FPS}:seed={seed}:jump=40",
        f"rgbtestsrc=s={size}:r={FPS},{scroll}",
    )
    hue = 47.0 * (group // len(patterns)) + rng.uniform(-10.0, 10.0)
    return f"{patterns[group % len(patterns)]},hue=h={hue:.2f}"


def _drawtext(text: str, size: int, x: str, y: str, box: str, border: int, enable: str = "") -> str:
    on = f":enable='between(t,{enable})'" if enable else ""
    return (f"drawtext=fontfile={FONT}:text='{text}':fontsize={size}:fontcolor=white:x={x}:y={y}"
            f":box=1:boxcolor={box}:boxborderw={border}{on}")


def _render(path: Path, background: str, subtitles: list[dict], audio: Path | None,
            seconds: float, w: int, h: int) -> None:
    """Encode background + watermark + subtitles (+ audio) to H.264/AAC mp4, byte-reproducibly."""
    sub, mark = round(h * 30 / 360), round(h * 18 / 360)
    chain = [background, _drawtext(WATERMARK, mark, f"w-tw-{mark}", str(mark), "black@0.7", mark // 4)]
    for s in subtitles:
        chain.append(_drawtext(s["text"], sub, "(w-tw)/2", f"h-th-{sub}", "black@0.8", sub // 3,
                               f"{s['start']},{s['end']}"))
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", *(["-i", str(audio)] if audio else [])]
    cmd += ["-filter_complex", f"{','.join(chain)},format=yuv420p[v]",
            "-map", "[v]", "-r", str(FPS), "-t", f"{seconds}", "-c:v", "libx264", "-preset", "veryfast",
            "-crf", "24", "-g", str(2 * FPS), *_BITEXACT]
    cmd += ["-map", "0:a", "-c:a", "aac", "-b:a", "64k", "-ar", "16000", "-ac", "1"] if audio else ["-an"]
    tmp = path.with_name(f".tmp-{path.name}")
    _run([*cmd, "-f", "mp4", str(tmp)])
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Job:
    topic: int
    index: int
    video_id: str
    factors: Factors


def _make_video(job: _Job, out_dir: Path, seed: int, seconds: float, w: int, h: int) -> dict:
    """Plan, speak and render one video; return its truth record (with a title)."""
    rng = random.Random(f"usv-synth:{seed}:{job.video_id}")
    f = job.factors
    subs = _subtitles(rng, seconds, TEXT_THEMES[f.text_group % len(TEXT_THEMES)],
                      int(w / (round(h * 30 / 360) * 0.6)) - 2)
    background = _pattern(rng, f.visual_group, w, h)
    with tempfile.TemporaryDirectory(prefix="usv-synth-") as tmp:
        turns, track = _speech(rng, seconds, f.audio_group, Path(tmp))
        _write_wav(Path(tmp) / "mix.wav", track)
        _render(out_dir / "videos" / f"{job.video_id}.mp4", background, subs, Path(tmp) / "mix.wav",
                seconds, w, h)
    name, _ = topic_name(job.topic)
    a, b, tail = rng.choice(subs)["noun"], rng.choice(turns)["noun"], rng.choice(_TAILS)
    title = rng.choice((f"{name}: {a} {b} {tail}", f"my {name} {tail} with {a} and {b}",
                        f"{a} and {b} | {name}", f"{name} {tail}: the {a} {b}"))
    return {"video_id": job.video_id, "topic": name, "title": title, "watermark": WATERMARK,
            "subtitles": [{k: s[k] for k in ("start", "end", "text")} for s in subs],
            "speech": [{k: v for k, v in s.items() if k != "noun"} for s in turns],
            "num_speakers": len({s["speaker"] for s in turns}), **asdict(f)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    return buf.getvalue()


def make_corpus(out_dir: Path, topics: int = 6, per_topic: int = 2, seconds: float = 8.0,
                seed: int = 0, width: int = 640, height: int = 360) -> Path:
    """Write videos/, manifest.csv and truth.jsonl under `out_dir`; return the manifest path."""
    _check_tools()
    if topics < 1 or per_topic < 1 or seconds < 3.0:
        raise ValueError("need topics >= 1, per_topic >= 1 and seconds >= 3")
    if width % 2 or height % 2:
        raise ValueError("width and height must be even for yuv420p")
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(t, v, f"t{t}-v{v}", topic_factors(t, topics)) for t in range(topics) for v in range(per_topic)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        truths = list(pool.map(lambda j: _make_video(j, out_dir, seed, seconds, width, height), jobs))
    rows = [{"video_id": r["video_id"], "source": f"videos/{r['video_id']}.mp4", "title": r["title"],
             "topic": r["topic"], "macro_topic": topic_name(j.topic)[1], "split": "", "creator": f"synth{j.index % 3}",
             "language": "en"} for j, r in zip(jobs, truths, strict=True)]
    _write_atomic(out_dir / "truth.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in truths))
    manifest = out_dir / "manifest.csv"
    _write_atomic(manifest, _csv(rows))
    return manifest


def add_broken_inputs(out_dir: Path) -> list[dict]:
    """Write inputs that must fail (not_a_video, no_audio, fetch) and return their manifest rows."""
    _check_tools()
    videos = Path(out_dir) / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    (videos / "broken-not-a-video.mp4").write_text("this is a text file, not a video\n", encoding="utf-8")
    subs = [{"start": 0.0, "end": 3.0, "text": "no sound here at all"}]
    rng = random.Random("usv-synth:broken")
    _render(videos / "broken-no-audio.mp4", _pattern(rng, 0, 640, 360), subs, None, 3.0, 640, 360)
    name, macro = topic_name(0)
    base = {"topic": name, "macro_topic": macro, "split": "", "creator": "broken", "language": "en"}
    return [{"video_id": "broken-not-a-video", "source": "videos/broken-not-a-video.mp4",
             "title": f"{name}: not a video", **base},
            {"video_id": "broken-no-audio", "source": "videos/broken-no-audio.mp4",
             "title": f"{name}: silent clip", **base},
            {"video_id": "broken-missing", "source": "videos/broken-missing.mp4",
             "title": f"{name}: missing file", **base}]


def file_digest(path: Path) -> str:
    """sha256 of a file; used to check that a seed reproduces a corpus byte for byte."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
