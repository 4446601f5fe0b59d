"""Prefect flows `train-topic` and `train-retrieval`: training on cached features, schedulable
like the build. Parameters are the typed configs (or a YAML file plus dotted overrides), so a
deployment can pin a config file and a run can change one setting. The flow runs training in
its own process; multi-GPU training is `torchrun … -m usv.cli train …` (see training/cli.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from training.config import RetrievalConfig, TopicConfig, load_yaml


def _rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    if metrics.get("task") == "topic":
        return [{"branches": k, **v} for k, v in metrics.get("table5", {}).items()]
    rows = []
    for name, m in metrics.get("table6", {}).items():
        zs = metrics.get("table7_zero_shot", {}).get(name, {})
        for direction in ("video_to_title", "title_to_video"):
            rows.append({"modalities": name, "direction": direction, **m[direction], "zero_shot_mca": zs.get("mca")})
    return rows


def _publish(metrics: dict[str, Any], key: str) -> None:
    rows = _rows(metrics)
    if rows:
        create_table_artifact(rows, key=key, description=f"evaluation of {metrics.get('run')}")
    skipped = "".join(f"- skipped {k}: {v}\n" for k, v in metrics.get("skipped", {}).items())
    create_markdown_artifact(f"# {key}\n\nrun folder: `{metrics.get('run')}`\n\n{skipped}", key=f"{key}-run")


@flow(name="train-topic", log_prints=True)
def train_topic_flow(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                     config: TopicConfig | None = None) -> dict[str, Any]:
    """MMF-Net on packed shards: per-branch training, late fusion, Table 5 / Table 8 metrics."""
    from training.topic import train_topic

    cfg = config or load_yaml(TopicConfig, config_file, overrides)
    get_run_logger().info("training topic recognition on %s", cfg.data.shards)
    metrics = train_topic(cfg)
    _publish(metrics, "train-topic")
    return metrics


@flow(name="train-retrieval", log_prints=True)
def train_retrieval_flow(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                         config: RetrievalConfig | None = None) -> dict[str, Any]:
    """VTCL on packed shards: modality ablation, R@K / MedR both ways, zero-shot topics."""
    from training.retrieval import train_retrieval

    cfg = config or load_yaml(RetrievalConfig, config_file, overrides)
    get_run_logger().info("training video-title retrieval on %s", cfg.data.shards)
    metrics = train_retrieval(cfg)
    _publish(metrics, "train-retrieval")
    return metrics
