"""ASR against ground truth nobody here wrote: WER on the LibriVox clips of Debian's
`pocketsphinx-testdata` (normalised with whisper's English normaliser), no invented speech on
music-only audio (Big Buck Bunny's soundtrack) or silence, determinism, the weight assembly,
and the openai-whisper engine's real loading path (a randomly initialised checkpoint on disk)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from extractors.asr import AsrConfig, assign_speakers, compression_ratio, guard
from extractors.base import Video, file_digest, make_stage
from extractors.media import Probe, decode_audio
from extractors.weights import assemble_whisper_base, ct2_model_dir
from storage.manifest import ManifestRow
from usv.errors import ConfigError

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
needs_librivox = pytest.mark.skipif(not (LIBRIVOX / "transcription").exists(),
                                    reason="needs Debian's pocketsphinx-testdata")
CLIPS = ("sense_and_sensibility_01_austen_64kb-0870", "sense_and_sensibility_01_austen_64kb-0890",
         "sense_and_sensibility_01_austen_64kb-0920")


def audio_video(audio: np.ndarray, video_id: str = "v", turns: list[dict] | None = None) -> Video:
    probe = Probe(len(audio) / 16000, 25.0, 64, 64, 0, "h264", "aac", True, 16000, "mp4")
    row = ManifestRow(video_id=video_id, raw_id=video_id, source="", title="", topic="t")
    upstream = {"diarize": {"diar.json": json.dumps({"num_speakers": 1, "turns": turns}).encode()}} if turns else {}
    return Video(row, "hash-" + video_id, probe, audio=audio, upstream=upstream)


def seg(text: str, no_speech: float = 0.01, logprob: float = -0.2, start: float = 0.0, end: float = 1.0) -> dict:
    return {"start": start, "end": end, "text": text, "avg_logprob": logprob, "no_speech_prob": no_speech}


def test_guard_drops_repeats_loops_and_unlikely_speech() -> None:
    cfg = AsrConfig()
    segs = [seg("Thank you."), seg("thank you"), seg("Thank you!"), seg("Hello there."),
            seg("Hmm", no_speech=0.7, logprob=-0.6), seg("la " * 40), seg("  "), seg("Real words", no_speech=0.7)]
    assert [s["text"] for s in guard(segs, cfg)] == ["Thank you.", "thank you", "Hello there.", "Real words"]
    assert compression_ratio("la " * 40) > cfg.max_compression > compression_ratio("an ordinary sentence of words")


def test_speakers_by_largest_overlap() -> None:
    segs = [seg("a", start=0.0, end=2.0), seg("b", start=2.0, end=5.0), seg("c", start=9.0, end=10.0)]
    turns = [{"start": 0.0, "end": 2.5, "speaker": "SPEAKER_00"}, {"start": 2.5, "end": 6.0, "speaker": "SPEAKER_01"}]
    assign_speakers(segs, turns)
    assert [s["speaker"] for s in segs] == ["SPEAKER_00", "SPEAKER_01", None]


def test_whisper_base_is_assembled_atomically_and_verified(tmp_path: Path) -> None:
    folder = assemble_whisper_base(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                        "vocabulary.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    size = (folder / "model.bin").stat().st_size
    with open(folder / "model.bin", "r+b") as fh:  # a damaged copy is rebuilt, not trusted
        fh.truncate(size // 2)
    assert (assemble_whisper_base(tmp_path) / "model.bin").stat().st_size == size
    with pytest.raises(ConfigError, match=r"asr\.model"):
        ct2_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"asr\.model"):
        make_stage("asr", {"engine": "openai-whisper", "model": "base"}).weights_id()


@pytest.fixture(scope="module")
def base_stage():  # type: ignore[no-untyped-def]
    stage = make_stage("asr")
    stage.ensure_setup()
    return stage


@pytest.mark.slow
@needs_librivox
def test_wer_on_librivox_and_deterministic(base_stage) -> None:  # type: ignore[no-untyped-def]
    import time

    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    truth = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        words, _, key = line.rpartition("(")
        truth[key.strip(" )")] = words.replace("<s>", "").replace("</s>", "").strip()
    videos = [audio_video(decode_audio(str(LIBRIVOX / f"{c}.wav")), c,
                          turns=[{"start": 0.0, "end": 60.0, "speaker": "SPEAKER_00"}]) for c in CLIPS]
    t0 = time.perf_counter()
    results = base_stage.process(videos)
    seconds = time.perf_counter() - t0
    docs = [json.loads(r["asr.json"]) for r in results]
    wer = jiwer.wer([norm(truth[c]) for c in CLIPS], [norm(d["text"]) for d in docs])
    audio_s = sum(len(v.audio) / 16000 for v in videos)
    print(f"WER {wer:.3f} on {len(CLIPS)} LibriVox clips; real-time factor {seconds / audio_s:.2f}")
    assert wer <= 0.10
    for d in docs:
        assert d["language"] == "en" and d["language_probability"] > 0.5
        assert d["segments"] and all(s["speaker"] == "SPEAKER_00" for s in d["segments"])
        assert set(d["segments"][0]) == {"start", "end", "text", "avg_logprob", "no_speech_prob", "speaker"}
    assert base_stage.process(videos[:1]) == results[:1]  # same bytes alone as in a batch
    c = base_stage.config  # the batched path reads what faster-whisper's own transcribe() reads
    for v, d in zip(videos, docs, strict=True):
        segments, _ = base_stage._model.transcribe(
            v.audio, beam_size=c.beam_size, temperature=0.0, condition_on_previous_text=False, vad_filter=True,
            vad_parameters={"min_silence_duration_ms": c.vad_min_silence_ms})
        assert " ".join(s.text.strip() for s in segments) == d["text"]
    rows = base_stage.table_rows("x", results[0])["asr_segments"]
    assert rows[0]["video_id"] == "x" and rows[0]["text"]


@pytest.mark.slow
def test_music_and_silence_give_an_empty_transcript(base_stage, bigbuckbunny: Path) -> None:  # type: ignore[no-untyped-def]
    music = decode_audio(str(bigbuckbunny))  # Big Buck Bunny: music and effects, no speech
    for audio in (music, np.zeros(16000 * 4, np.float32)):
        doc = json.loads(base_stage.process([audio_video(audio)])[0]["asr.json"])
        assert doc == {"language": None, "language_probability": None, "text": "", "segments": []}


@pytest.mark.slow
@needs_librivox
def test_openai_whisper_engine_loads_a_pt_checkpoint(tmp_path: Path) -> None:
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    path = tmp_path / "random-whisper.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, path)
    stage = make_stage("asr", {"engine": "openai-whisper", "model": str(path), "beam_size": 1})
    assert stage.weights_id() == file_digest([path])
    audio = decode_audio(str(LIBRIVOX / f"{CLIPS[0]}.wav"))
    first = stage.process([audio_video(audio)])
    assert stage.process([audio_video(audio)]) == first  # garbage, but the same garbage
    doc = json.loads(first[0]["asr.json"])
    assert set(doc) == {"language", "language_probability", "text", "segments"}
