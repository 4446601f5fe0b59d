"""Diarization against ground truth nobody here wrote: pyannote.audio's own `sample.wav` with its
`sample.rttm` (DER), and the synthetic corpus's known speaker counts; plus determinism and the
pyannote backend's loading errors (its gated checkpoints are not available offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from extractors.base import Video, make_stage
from extractors.diarize import cluster, load_pyannote, name_speakers, smooth_turns
from extractors.media import Probe, decode_audio
from storage.manifest import ManifestRow
from usv.errors import ConfigError, ErrorKind, UsvError

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                  reason="needs ffmpeg and espeak-ng")


def audio_video(audio: np.ndarray | None, video_id: str = "v", title: str = "") -> Video:
    """A decoded video holding only an audio track (what audio stages see)."""
    duration = 0.0 if audio is None else len(audio) / 16000
    probe = Probe(duration, 25.0, 64, 64, 0, "h264", "aac" if audio is not None else "", audio is not None,
                  16000, "mp4")
    row = ManifestRow(video_id=video_id, raw_id=video_id, source="", title=title, topic="t")
    return Video(row, "hash-" + video_id, probe, audio=audio)


def pyannote_sample() -> tuple[np.ndarray, Path]:
    import importlib.util

    import soundfile as sf

    spec = importlib.util.find_spec("pyannote.audio")
    assert spec is not None and spec.origin
    folder = Path(spec.origin).parent / "sample"
    wav, rate = sf.read(folder / "sample.wav", dtype="float32")
    assert rate == 16000
    return wav, folder / "sample.rttm"


def test_turn_smoothing_absorbs_flickers_and_names_by_first_appearance() -> None:
    labels = np.array([1] * 100 + [0] * 10 + [1] * 100 + [0] * 150)  # a 0.1 s flicker inside speaker 1
    turns = smooth_turns([(2.0, 5.6), (6.0, 7.0)], [labels, np.zeros(100, dtype=int)], min_turn_s=0.5,
                         merge_gap_s=0.5)
    assert [(t["start"], t["end"], t["speaker"]) for t in turns] == [(2.0, 4.1, 1), (4.1, 7.0, 0)]
    diar = name_speakers(turns)
    assert diar["num_speakers"] == 2
    assert [t["speaker"] for t in diar["turns"]] == ["SPEAKER_00", "SPEAKER_01"]
    assert name_speakers([]) == {"num_speakers": 0, "turns": []}


def test_clustering_estimates_the_number_of_speakers() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 256))
    emb = np.concatenate([c + 0.15 * rng.normal(size=(8, 256)) for c in centres])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    weights = np.full(len(emb), 0.75)
    labels = cluster(emb, weights, 0.3, max_speakers=6, min_cluster=0.5)
    assert len(set(labels)) == 3 and all(len(set(labels[i * 8:(i + 1) * 8])) == 1 for i in range(3))
    assert len(set(cluster(emb, weights, 0.3, max_speakers=2, min_cluster=0.5))) == 2
    # a cluster with too little speech is folded into its nearest neighbour
    assert len(set(cluster(emb[:18], weights[:18], 0.3, max_speakers=6, min_cluster=2.0))) == 2


def test_pyannote_backend_says_which_setting_provides_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"diarize\.pipeline"):
        load_pyannote(None)
    with pytest.raises(ConfigError, match=r"diarize\.pipeline"):
        make_stage("diarize", {"backend": "pyannote"}).fingerprint()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a local folder"):
        load_pyannote("pyannote/speaker-diarization-community-1")
    # a local folder whose config names checkpoints that are not there: the real loader fails
    (tmp_path / "config.yaml").write_text(
        "pipeline:\n  name: pyannote.audio.pipelines.SpeakerDiarization\n  params:\n"
        f"    segmentation: {tmp_path}/missing-segmentation.bin\n    embedding: {tmp_path}/missing-embedding.bin\n")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_pyannote(str(tmp_path))
    stage = make_stage("diarize", {"backend": "pyannote", "pipeline": str(tmp_path)})
    assert stage.weights_id()  # hashes the folder's files
    with pytest.raises(ConfigError):
        stage.ensure_setup()


def test_no_audio_is_a_typed_error() -> None:
    stage = make_stage("diarize")
    (result,) = stage.process([audio_video(None)])
    assert isinstance(result, UsvError) and result.kind is ErrorKind.NO_AUDIO


@pytest.mark.slow
def test_der_on_pyannote_sample_and_deterministic() -> None:
    from pyannote.core import Annotation, Segment
    from pyannote.database.util import load_rttm
    from pyannote.metrics.diarization import DiarizationErrorRate

    wav, rttm = pyannote_sample()
    stage = make_stage("diarize")
    stage.ensure_setup()
    first = stage.process([audio_video(wav), audio_video(np.zeros(16000 * 3, np.float32), "silent")])
    again = stage.process([audio_video(wav)])
    assert first[0] == again[0]  # same input, same bytes (alone or in a batch)
    diar = json.loads(first[0]["diar.json"])
    assert json.loads(first[1]["diar.json"]) == {"num_speakers": 0, "turns": []}
    hyp = Annotation()
    for t in diar["turns"]:
        hyp[Segment(t["start"], t["end"])] = t["speaker"]
    ref = next(iter(load_rttm(rttm).values()))
    der = DiarizationErrorRate(collar=0.5, skip_overlap=True)(ref, hyp, uem=Segment(0, len(wav) / 16000))
    print(f"DER on pyannote sample.wav: {der:.3f} ({diar['num_speakers']} speakers)")
    assert der <= 0.20
    assert diar["num_speakers"] == 2
    rows = stage.table_rows("sample", first[0])["speaker_turns"]
    assert rows[0]["video_id"] == "sample" and len(rows) == len(diar["turns"])


@pytest.mark.slow
@needs_ffmpeg
def test_speaker_count_on_synthetic_corpus(tmp_path: Path) -> None:
    from usv.synth import make_corpus

    manifest = make_corpus(tmp_path, topics=4, per_topic=3, seconds=8)
    truth = [json.loads(line) for line in (manifest.parent / "truth.jsonl").read_text().splitlines()]
    videos = [audio_video(decode_audio(str(tmp_path / "videos" / f"{t['video_id']}.mp4")), t["video_id"])
              for t in truth]
    stage = make_stage("diarize")
    stage.ensure_setup()
    found = [json.loads(r["diar.json"])["num_speakers"] for r in stage.process(videos)]  # type: ignore[index]
    right = sum(f == t["num_speakers"] for f, t in zip(found, truth, strict=True))
    print(f"speaker count right for {right}/{len(truth)} synthetic videos")
    assert right >= 0.9 * len(truth), list(zip(found, [t["num_speakers"] for t in truth], strict=True))


def test_mel_matches_resemblyzer_without_loading_numba() -> None:
    """The encoder's input equals Resemblyzer's own librosa mel, computed without numba's JIT."""
    import subprocess
    import sys

    import torch
    from resemblyzer.audio import wav_to_mel_spectrogram

    from extractors.diarize import resemblyzer_mel

    wav = (np.random.default_rng(0).standard_normal(16000 * 3) * 0.1).astype(np.float32)
    theirs = wav_to_mel_spectrogram(wav)
    ours = resemblyzer_mel()(torch.from_numpy(wav)).numpy().T
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    code = ("import sys, numpy as np; from extractors.base import make_stage;"
            "from tests.test_diarize import audio_video;"
            "s = make_stage('diarize'); s.ensure_setup(); w = np.random.default_rng(1).standard_normal(48000) * 0.1;"
            "s.process([audio_video(w.astype(np.float32))]); print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
