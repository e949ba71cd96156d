"""Serving processes on this machine: started on a socket bound before they start, recognised by pid.

The backend starts routers with them, and a router starts its model hosts (replicas) with them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bincount.local.httpio import listening_socket

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def spawn(
    module: str, args: list[str], bind_host: str, port: int, workdir: Path, kind: str, new_session: bool
) -> tuple[subprocess.Popen, int]:
    """Start ``python -m module`` serving on a socket bound here (so its port is known now); its output goes to
    ``workdir/<kind>-<pid>.log``. ``new_session``: not killed with the process that started it."""
    sock = listening_socket(bind_host, port)
    try:
        port = sock.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
        log_path = workdir / f"{kind}-pending-{os.getpid()}-{port}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--fd", str(sock.fileno()), "--host", bind_host],
                pass_fds=[sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
                env=env,
                cwd=PROJECT_ROOT,
            )
        log_path.rename(log_file(workdir, kind, proc.pid))
    finally:
        sock.close()
    return proc, port


def log_file(workdir: Path, kind: str, pid: int) -> Path:
    return workdir / f"{kind}-{pid}.log"


def is_ours(pid: int, module: str = "bincount.local.") -> bool:
    """Whether ``pid`` is a live (not zombie) process running ``module``: guards against reused pids."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and module.encode() in cmdline


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
