"""The cluster configs we ship: valid against the schemas that exist for them, and consistent with each other.

- `cluster/aws-gpu.yaml` is validated against the cluster launcher's own JSON schema (`ray-schema.json`, shipped
  inside ray); every KubeRay pod template (head, workers, RayJob submitter) against Kubernetes' PodTemplateSpec
  schema (`kubernetes-validate`, strict: an unknown field is an error). No schema for KubeRay's CRDs is installable
  from PyPI, so their own fields are checked by the rules below.
- Rules: token auth on every node and client; the launcher's dashboard on loopback (reached through `ray dashboard`),
  KubeRay's on the pod network behind a ClusterIP Service only (reached through `kubectl port-forward`); the dataset
  mounted where the driver reads it (the head) and on every worker; one image name, set in deploy/image.env; the
  image has what the launcher needs (rsync) and what the GPU metrics need (nvidia-ml-py); no credentials anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "cluster" / "aws-gpu.yaml"
KUBERAY = [ROOT / "cluster" / "kuberay" / "raycluster.yaml", ROOT / "cluster" / "kuberay" / "rayjob.yaml"]
CONFIGS = [LAUNCHER, *KUBERAY]
IMAGE_ENV = ROOT / "deploy" / "image.env"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def image_name() -> str:
    (name,) = re.findall(r"^IMAGE=(\S+)$", IMAGE_ENV.read_text(), re.M)
    return name


def kuberay_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template of a KubeRay manifest, by role: head, worker:<group>, submitter."""
    spec = kuberay_spec(doc)
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({f"worker:{g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]})
    if "submitterPodTemplate" in doc["spec"]:
        out["submitter"] = doc["spec"]["submitterPodTemplate"]
    return out


def mounts(template: dict) -> dict[str, str]:
    """mountPath -> the volume's source (PVC claim name, or the volume kind) of the template's first container."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    out = {}
    for m in template["spec"]["containers"][0].get("volumeMounts", []):
        vol = volumes[m["name"]]
        out[m["mountPath"]] = vol["persistentVolumeClaim"]["claimName"] if "persistentVolumeClaim" in vol \
            else next(k for k in vol if k != "name")
    return out


def flag(command: str, name: str) -> str:
    return re.search(rf"{name}[ =](\S+)", command).group(1)


# ------------------------------------------------------------------------------------------------ schemas
def test_launcher_config_matches_the_launchers_schema():
    import jsonschema
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    doc = load(LAUNCHER)
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError, match="imag"):   # the schema does catch a typo
        jsonschema.validate({**doc, "docker": {**doc["docker"], "imag": doc["docker"]["image"]}}, schema)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pod_templates_match_the_kubernetes_schema(path):
    import kubernetes_validate
    templates = pod_templates(load(path))
    assert {"head", "worker:gpu"} <= set(templates)
    for role, template in templates.items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.replace(":", "-")},
                        "template": template}
        kubernetes_validate.validate(pod_template, "1.30.0", strict=True)
    broken = json.loads(json.dumps(templates["head"]))
    broken["spec"]["containers"][0]["volumeMount"] = []          # a typo the schema must catch
    with pytest.raises(Exception, match="volumeMount"):
        kubernetes_validate.validate({**pod_template, "template": broken}, "1.30.0", strict=True)


# ------------------------------------------------------------------------------------------------ security
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_credentials(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|password", text, re.I)


def test_launcher_token_auth_and_loopback_dashboard():
    doc = load(LAUNCHER)
    starts = [c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(re.match(r"RAY_AUTH_MODE=token (\w+=\S+ )*ray start", c) for c in starts)
    assert flag(doc["head_start_ray_commands"][-1], "--dashboard-host") == "127.0.0.1"
    assert doc["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "ray dashboard cluster/aws-gpu.yaml" in LAUNCHER.read_text()      # the documented way in


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_token_everywhere_and_dashboard_inside_the_cluster_only(path):
    doc = load(path)
    spec = kuberay_spec(doc)
    for role, template in pod_templates(doc).items():
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", role
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "simclr-ray-token",
                                                                          "key": "auth_token"}, role
    head = spec["headGroupSpec"]
    # KubeRay's submitter and probes reach the dashboard through the head Service: it must not be on loopback ...
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # ... and that Service must stay inside the cluster (kubectl port-forward from outside)
    assert head["serviceType"] == "ClusterIP"
    assert not re.search(r"LoadBalancer|NodePort|Ingress|hostNetwork|hostPort", yaml.safe_dump(doc))  # comments aside
    assert head["rayStartParams"]["num-cpus"] == "0"


# ------------------------------------------------------------------------------------------------ growth
def test_launcher_states_what_its_workers_add_up_to():
    """SIMCLR_MAX_CLUSTER_* on the head = max_workers x resources of the worker types (+ the head's own): a job
    larger than today's nodes then waits for the autoscaler, and one larger than this fails at once."""
    doc = load(LAUNCHER)
    env = dict(re.findall(r"(SIMCLR_MAX_CLUSTER_\w+)=(\S+)", doc["head_start_ray_commands"][-1]))
    types = doc["available_node_types"]
    for res, var in (("CPU", "SIMCLR_MAX_CLUSTER_CPUS"), ("GPU", "SIMCLR_MAX_CLUSTER_GPUS")):
        most = types["head"]["resources"].get(res, 0) + sum(
            t["max_workers"] * t["resources"][res] for name, t in types.items() if name != "head")
        assert float(env[var]) == most, (var, env[var], most)
    assert sum(t["max_workers"] for n, t in types.items() if n != "head") <= doc["max_workers"]


def quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_states_what_its_workers_add_up_to(path):
    spec = kuberay_spec(load(path))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    cpus = float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) + sum(
        g["maxReplicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for g in spec["workerGroupSpecs"])
    gpus = sum(g["maxReplicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                        .get("nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])
    assert (float(env["SIMCLR_MAX_CLUSTER_CPUS"]), float(env["SIMCLR_MAX_CLUSTER_GPUS"])) == (cpus, gpus)


# ------------------------------------------------------------------------------------------------ data
def test_launcher_mounts_the_data_on_every_node():
    doc = load(LAUNCHER)
    init = " ".join(doc["initialization_commands"])      # run on every host, head included, before docker
    assert re.search(r"mount -t nfs4 .* /data\b", init) and "mountpoint -q /data" in init
    assert "-v /data:/data:ro" in doc["docker"]["run_options"]
    for node_type in doc["available_node_types"].values():   # no per-type docker override dropping the mount
        assert "docker" not in node_type
    assert flag(LAUNCHER.read_text(), "--data-root").startswith("/data/")


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_data_on_the_head_and_every_worker(path):
    doc = load(path)
    templates = {r: t for r, t in pod_templates(doc).items() if r != "submitter"}
    data = {role: mounts(t).get("/data") for role, t in templates.items()}
    assert set(data.values()) == {"imagenet-ro"}, data
    for t in templates.values():
        assert all(m.get("readOnly") for m in t["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/data")
    if "entrypoint" in doc["spec"]:   # the RayJob's driver runs on the head and reads --data-root there
        assert flag(doc["spec"]["entrypoint"], "--data-root").startswith("/data/")


# ------------------------------------------------------------------------------------------------ the image
def test_one_image_name_everywhere():
    name = image_name()
    assert re.fullmatch(r"[a-z0-9][a-z0-9._/-]*:[\w.-]+", name), name   # docker refuses upper-case repositories
    assert load(LAUNCHER)["docker"]["image"] == name
    for path in KUBERAY:
        images = {c["image"] for t in pod_templates(load(path)).values() for c in t["spec"]["containers"]}
        assert images == {name}, (path.name, images)
    for path in CONFIGS:   # and no other image name hides in a comment
        assert set(re.findall(r"\b[\w.-]+/[\w.-]+/simclr-dist:[\w.-]+", path.read_text())) == {name}, path.name


def test_set_image_renames_it_in_every_file(tmp_path):
    if not shutil.which("make"):
        pytest.fail("make is needed (it is how the README builds everything)")
    files = ["Makefile", "deploy/image.env", *(str(p.relative_to(ROOT)) for p in CONFIGS)]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    new = "registry.example.com/team/simclr-dist:0.2.0"
    out = subprocess.run(["make", "-s", "set-image", f"IMAGE={new}"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    old = image_name()
    for f in files[1:]:
        text = (tmp_path / f).read_text()
        assert old not in text and new in text, f
    assert (tmp_path / "cluster/aws-gpu.yaml").read_text() == LAUNCHER.read_text().replace(old, new)
    bad = subprocess.run(["make", "-s", "set-image", "IMAGE=Bad Name"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "not a valid image reference" in bad.stdout + bad.stderr


def test_dockerfile_has_what_the_launcher_and_the_metrics_need():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in pins and "ray[train,tune,default]==2.60.0" in pins and "ffcv==1.0.2" in pins
    assert any(p.startswith("nvidia-ml-py") for p in pins)          # pynvml: GPU utilisation
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11" in docker and "pip install ." in docker and "import pynvml" in docker
    apt = re.search(r"apt-get install[^&]*", docker).group(0).split()
    assert "rsync" in apt and "openssh-client" in apt               # the launcher's docker runner, the autoscaler
    for pkg in ("libturbojpeg0-dev", "libopencv-dev", "pkg-config"):
        assert pkg in apt and pkg in (ROOT / "deploy" / "install-system-deps.sh").read_text()


def test_local_cluster_script_is_valid_and_loopback_only():
    script = ROOT / "cluster" / "local-cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--dashboard-host 127.0.0.1" in text and "RAY_AUTH_MODE=token" in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "stop-node" in usage.stdout
