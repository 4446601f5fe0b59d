"""The local Prefect server: SQLite under the project's data folder, loopback only.

`usv server up` starts `prefect server start` detached (its own session, pid file, log file)
and waits for its health endpoint; every usv command then talks to it through
PREFECT_API_URL. Nothing here binds beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PORT = 4200


def data_dir() -> Path:
    return Path(os.environ.get("USV_DATA", "data")).resolve()


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or data_dir() / "prefect").resolve()


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def server_env(port: int) -> dict[str, str]:
    """Settings for a server process and for clients of it."""
    home = prefect_home()
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url(port),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def _pid_file() -> Path:
    return prefect_home() / "server.pid"


def server_up(port: int = DEFAULT_PORT, wait_s: float = 120.0) -> subprocess.Popen[bytes] | None:
    """Start the server unless one already answers on `port`; return the process started."""
    if healthy(port):
        return None
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")  # noqa: SIM115 - handed to the child
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **server_env(port)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    _pid_file().write_text(f"{proc.pid} {port}\n")
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if healthy(port):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {home / 'server.log'}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"prefect server did not answer within {wait_s}s; see {home / 'server.log'}")


def server_down() -> bool:
    """Stop the server started by `server_up` (its whole process group)."""
    pid_file = _pid_file()
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return True
