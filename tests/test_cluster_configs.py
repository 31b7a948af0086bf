"""The cluster configs we ship parse, keep token authentication on, bind dashboards to loopback, run the pinned
image, and hold no credentials."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "cluster" / "aws-gpu.yaml", ROOT / "cluster" / "kuberay" / "raycluster.yaml",
           ROOT / "cluster" / "kuberay" / "rayjob.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_keeps_token_auth(path):
    text = path.read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    assert "RAY_AUTH_MODE=token" in text or re.search(r"name: RAY_AUTH_MODE\s+value: token", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    assert re.search(r"dashboard-host[=:]\s*\"?127\.0\.0\.1", text)


def test_kuberay_every_container_gets_the_token():
    for path in CONFIGS[1:]:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "simclr-ray-token"


def test_launcher_starts_every_node_with_token_auth():
    doc = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    for cmd in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.startswith("RAY_AUTH_MODE=token ray start")
    assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_local_cluster_script_is_valid_and_loopback_only():
    script = ROOT / "cluster" / "local-cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--dashboard-host 127.0.0.1" in text and "RAY_AUTH_MODE=token" in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "stop-node" in usage.stdout


def test_dockerfile_installs_the_pinned_package():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in pins and "ray[train,tune,default]==2.60.0" in pins and "ffcv==1.0.2" in pins
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11" in docker and "pip install ." in docker
    for pkg in ("libturbojpeg0-dev", "libopencv-dev", "pkg-config"):
        assert pkg in docker and pkg in (ROOT / "deploy" / "install-system-deps.sh").read_text()
