"""`usv train topic|retrieval` and `usv eval`: thin shells over training.topic / training.retrieval.

Several GPUs (or CPU processes): `torchrun --nproc_per_node N -m usv.cli train topic --config …`.
Any setting can be given as `--set dotted.key=value` (YAML value), on top of `--config`.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
import yaml

from training.config import RetrievalConfig, TopicConfig, load_yaml

train_app = typer.Typer(help="Train on packed shards (never decodes video).", no_args_is_help=True)

ConfigOpt = Annotated[str | None, typer.Option(help="YAML TopicConfig / RetrievalConfig")]
ShardsOpt = Annotated[str | None, typer.Option(help="build output root or its shards/ folder (path or URL)")]
OutputOpt = Annotated[str | None, typer.Option(help="parent folder of run folders")]
NameOpt = Annotated[str | None, typer.Option(help="run folder name")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value override, repeatable")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print metrics as JSON")]


def _overrides(shards: str | None, output: str | None, name: str | None, seed: int | None, device: str | None,
               sets: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"data.shards": shards, "run.output": output, "run.name": name, "run.seed": seed,
                           "run.device": device}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _log() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _show(metrics: dict[str, Any], as_json: bool) -> None:
    from training.retrieval import table6
    from training.topic import table5

    if as_json:
        typer.echo(json.dumps(metrics, indent=1, default=str))
        return
    if metrics.get("run"):
        typer.echo(f"run: {metrics['run']}")
    typer.echo(table5(metrics) if metrics.get("task") == "topic" else table6(metrics))
    for name, reason in metrics.get("skipped", {}).items():
        typer.echo(f"skipped {name}: {reason}")


@train_app.command("topic")
def topic(config: ConfigOpt = None, shards: ShardsOpt = None, output: OutputOpt = None, name: NameOpt = None,
          seed: int | None = None, device: str | None = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """MMF-Net: train the visual, audio and text branches separately, evaluate them fused (Table 5)."""
    from training.topic import train_topic

    _log()
    cfg = load_yaml(TopicConfig, config, _overrides(shards, output, name, seed, device, sets))
    metrics = train_topic(cfg)
    if metrics.get("task"):  # only rank 0 evaluates
        _show(metrics, as_json)


@train_app.command("retrieval")
def retrieval(config: ConfigOpt = None, shards: ShardsOpt = None, output: OutputOpt = None, name: NameOpt = None,
              seed: int | None = None, device: str | None = None, sets: SetOpt = None,
              as_json: JsonOpt = False) -> None:
    """VTCL: video–title contrastive training per modality set; R@K, MedR, zero-shot (Tables 6–7)."""
    from training.retrieval import train_retrieval

    _log()
    cfg = load_yaml(RetrievalConfig, config, _overrides(shards, output, name, seed, device, sets))
    metrics = train_retrieval(cfg)
    if metrics.get("task"):
        _show(metrics, as_json)


def evaluate(
    run: Annotated[str, typer.Argument(help="run folder written by `usv train …`")],
    shards: ShardsOpt = None,
    split: Annotated[str | None, typer.Option(help="split to score (default: the run's eval split)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    write: Annotated[bool, typer.Option(help="overwrite the run's metrics.json")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Reload a run's checkpoints and score a split (reproduces metrics.json on the same shards)."""
    from training.runs import Run

    _log()
    task, _ = Run(run).load_config()
    if task == "topic":
        from training.topic import evaluate_topic

        metrics = evaluate_topic(run, shards, split, device, write=write)
    else:
        from training.retrieval import evaluate_retrieval

        metrics = evaluate_retrieval(run, shards, split, device, write=write)
    _show(metrics, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.command("eval")(evaluate)
