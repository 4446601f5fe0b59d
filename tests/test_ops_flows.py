"""Through Prefect (the flows behind `usv build` and `usv shards`): a build re-runs only the
stage whose settings changed and publishes the per-stage table artifact of `usv status`;
`rebuild-shards` re-packs a subset of stages with another split scheme, extracting nothing."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from test_ops_stages import prefect_server

from usv.synth import make_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server(tmp_path_factory.mktemp("prefect")) as env, \
            temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield env["PREFECT_API_URL"]


def _ledger_artifact() -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["build-ledger"])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)
    data = arts[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_build_then_change_one_stage_then_rebuild_shards(api: str, tmp_path: Path) -> None:
    manifest = make_corpus(tmp_path / "corpus", topics=2, per_topic=2, seconds=3)
    root = tmp_path / "out"
    from flows.build import build_usv, rebuild_shards

    first = build_usv(manifest=str(manifest), output=str(root), stages=["meta", "mel", "frames"])
    assert all(first["counts"][s] == {"ok": 4} for s in ("meta", "mel", "frames")), first["counts"]

    config = tmp_path / "frames.yaml"
    config.write_text(yaml.safe_dump({"stages": ["meta", "mel", "frames"], "stage_config": {"frames": {"every": 2}}}))
    second = build_usv(manifest=str(manifest), output=str(root), config_file=str(config))
    assert second["counts"]["frames"] == {"ok": 4}, second["counts"]
    assert second["counts"]["meta"] == {"cached": 4} and second["counts"]["mel"] == {"cached": 4}
    table = {row["stage"]: row for row in _ledger_artifact()}
    assert table["frames"]["ran_ok"] == 4 and table["frames"]["cached"] == 0 and table["frames"]["done"] == 4
    assert table["mel"]["ran_ok"] == 0 and table["mel"]["cached"] == 4 and table["mel"]["pending"] == 0

    runs = sorted(p.name for p in (root / "ledger").iterdir())
    features = sorted(str(p) for p in (root / "features").rglob("*"))
    result = rebuild_shards(output=str(root), stages=["meta", "mel"], split_ratios={"train": 0.5, "test": 0.5},
                            seed=3)
    assert result["total_samples"] == 4
    assert sorted(p.name for p in (root / "ledger").iterdir()) == runs, "re-packing must not extract"
    assert sorted(str(p) for p in (root / "features").rglob("*")) == features
    index = json.loads((root / "shards" / "index.json").read_text())
    assert set(index["stages"]) == {"meta", "mel"} and set(index["splits"]) == {"train", "test"}
    assert not (root / "shards" / "val").exists() or not list((root / "shards" / "val").glob("*.tar"))
    keys: Counter[str] = Counter()
    for tar in (root / "shards").glob("*/*.tar"):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            keys[sample["__key__"]] += 1
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"meta.json", "mel.npy"}
            assert json.loads(sample["meta.json"])["split"] == tar.parent.name
    assert len(keys) == 4 and set(keys.values()) == {1}
