"""`usv`: the command line. Each command is a thin shell over a flow or a library call."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from usv import prefect_env

app = typer.Typer(help="usv: short videos → multimodal features in WebDataset shards, and training on them.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
server_app = typer.Typer(help="The local Prefect server (SQLite under $USV_DATA/prefect, loopback only).",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")

REPO = Path(__file__).resolve().parent.parent
StagesOpt = Annotated[str | None, typer.Option(help="comma-separated stages, e.g. meta,mel,frames")]


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=1, default=str))
        return
    from rich import print as rprint

    rprint(obj)


def _stages(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _local_prefect() -> None:
    """Without a server configured, keep Prefect's ephemeral state under the data folder."""
    os.environ.setdefault("PREFECT_HOME", str(prefect_env.prefect_home()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder for videos/, manifest.csv, truth.jsonl")] = Path("data/synth"),
    topics: int = 6, per_topic: int = 2, seconds: float = 8.0, seed: int = 0,
) -> None:
    """Make a synthetic corpus whose subtitles, speech and speakers are known exactly."""
    from usv.synth import make_corpus

    manifest = make_corpus(out, topics=topics, per_topic=per_topic, seconds=seconds, seed=seed)
    typer.echo(f"wrote {manifest}")


@app.command()
def build(
    manifest: Annotated[str, typer.Argument(help="manifest (csv, jsonl, parquet; path or URL)")],
    output: Annotated[str, typer.Option(help="output root (path or fsspec URL)")] = "data/out",
    stages: StagesOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="videos per Prefect task")] = None,
    workers: Annotated[int | None, typer.Option(help="batches at once")] = None,
    task_runner: Annotated[str | None, typer.Option(help="threads | processes | dask | ray")] = None,
    config: Annotated[str | None, typer.Option(help="YAML BuildConfig; options override it")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar, only warnings from Prefect")] = False,
) -> None:
    """Run the build-usv flow in this process (no server needed); a progress bar with ETA on a terminal."""
    if quiet or as_json:
        os.environ["USV_QUIET"] = "1"
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    _local_prefect()
    from flows.build import build_usv

    summary = build_usv(manifest=manifest, output=output, stages=_stages(stages), batch_size=batch_size,
                        workers=workers, task_runner=task_runner, config_file=config)
    _print(summary if as_json else {k: summary[k] for k in ("output", "videos", "samples", "counts", "missing")},
           as_json)


@app.command()
def shards(
    output: Annotated[str, typer.Argument(help="output root of an earlier build")] = "data/out",
    stages: StagesOpt = None,
    seed: Annotated[int | None, typer.Option(help="shuffle/split seed")] = None,
    split_ratios: Annotated[str | None, typer.Option(help='JSON, e.g. {"train":0.9,"test":0.1}')] = None,
    config: Annotated[str | None, typer.Option(help="YAML BuildConfig")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-pack shards from the feature store (rebuild-shards flow); extracts nothing."""
    _local_prefect()
    from flows.build import rebuild_shards

    result = rebuild_shards(output=output, stages=_stages(stages), seed=seed,
                            split_ratios=json.loads(split_ratios) if split_ratios else None, config_file=config)
    _print(result if as_json else {k: result[k] for k in ("output", "samples", "missing")}, as_json)


@server_app.command("up")
def server_up(port: int = prefect_env.DEFAULT_PORT) -> None:
    """Start the server in the background (or find it running) and print its API URL."""
    prefect_env.server_up(port)
    typer.echo(f"Prefect server on {prefect_env.api_url(port)} (UI http://127.0.0.1:{port}); "
               f"export PREFECT_API_URL={prefect_env.api_url(port)}")


@server_app.command("down")
def server_down() -> None:
    """Stop the server started by `usv server up`."""
    typer.echo("stopped" if prefect_env.server_down() else "no server started by usv is running")


@server_app.command("env")
def server_env(port: int = prefect_env.DEFAULT_PORT) -> None:
    """Print `export` lines that point Prefect clients at the local server."""
    for k, v in prefect_env.server_env(port).items():
        typer.echo(f"export {k}={v}")


@app.command()
def deploy(
    port: int = prefect_env.DEFAULT_PORT,
    pool: str = "usv-local",
) -> None:
    """Create the process work pool and register the deployments of deploy/prefect.yaml."""
    env = {**os.environ, **prefect_env.server_env(port)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env, check=True)
    subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
                   env=env, check=True, cwd=REPO)


@app.command()
def worker(port: int = prefect_env.DEFAULT_PORT, pool: str = "usv-local", limit: int = 2) -> None:
    """Run a process worker for the work pool in the foreground (Ctrl-C stops it)."""
    env = {**os.environ, **prefect_env.server_env(port)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execve(prefect, [prefect, "worker", "start", "--pool", pool, "--limit", str(limit)], env)


# Commands that live beside their concept: each module defines `register(app)`.
EXTENSIONS = ("training.cli", "usv.ops", "usv.report", "usv.inspect", "usv.doctor")


def _register_extensions() -> None:
    import importlib

    for module in EXTENSIONS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_extensions()


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def leave(code: int | str | None) -> None:
    """End the process as Python would, minus the module teardown: threads are joined and exit
    handlers run (Prefect drains its log and event queues, stage worker processes stop, OpenVINO
    sessions close), then `os._exit`. Freeing torch, CTranslate2 and OpenVINO objects module by
    module takes 2–3 s after a build, and native destructors at that stage have crashed
    processes (openvinotoolkit/openvino#18388). `USV_FAST_EXIT=0` keeps the full shutdown."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if os.environ.get("USV_FAST_EXIT", "1") == "0" or shutdown is None:
        sys.exit(code)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
