"""A Ray head (and extra nodes) in their own processes, as `ray start` makes them, for the tests of the cluster path.

Each instance has its own temp dir and free loopback ports, and token authentication with a token handed over in
RAY_AUTH_TOKEN (so ~/.ray is left alone); `stop()` ends only its own processes (`ray stop` would end every Ray on
the machine, the test session's own included). PATH starts with this venv's bin/, as after `. .venv/bin/activate`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent          # not resolved: a venv's python is a symlink to the base one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int, **env_vars: str) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")   # short: socket paths must stay < 108 chars
        self.port, self.dashboard_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS of another Ray
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=str(ROOT), **env_vars)
        self.env = env
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.cli("start", "--head", "--num-cpus", str(num_cpus), "--port", str(self.port),
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                 "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                 "--temp-dir", self.temp_dir, "--disable-usage-stats", check=True, timeout=180)

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(["ray", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode:
            raise AssertionError(f"ray {' '.join(args[:2])} failed:\n{out.stdout}{out.stderr}")
        return out

    def add_node(self, num_cpus: int) -> None:
        """Join a second node to this head (what an autoscaler does when it adds a machine)."""
        self.cli("start", "--address", self.address, "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir,
                 "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", check=True, timeout=180)

    def client_env(self) -> dict[str, str]:
        """The environment of a driver joining this cluster through RAY_ADDRESS."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        import psutil
        mine = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
                and any(self.temp_dir in a or a.endswith(f":{self.port}") or a == f"--gcs_server_port={self.port}"
                        for a in p.info["cmdline"])]
        victims = {q.pid: q for p in mine for q in [p, *p.children(recursive=True)] if q.pid != os.getpid()}
        for p in victims.values():
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(victims.values()), timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
