"""Monitoring, end to end: every Ray Train worker's series reach a real Prometheus through Ray's own service
discovery, and deploy/ (scrape config, rules, Grafana dashboard) is valid and refers only to exported metrics.

The integration test runs Debian's ``prometheus`` on a free loopback port against the session Ray (conftest starts
it with the dashboard, which writes the discovery file, and a 1 s metrics export); the unit tests use ``promtool``.
Both binaries come from ``deploy/install-system-deps.sh`` (``make test`` runs it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import yaml

from simclr_dist import pretrain
from simclr_dist.config import parse_config
from simclr_dist.run.train.metrics import METRICS, NvmlProbe, exported_names, window_stats

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus-rules.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "simclr-dashboard.json"
RUN = "mon"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: run `bash deploy/install-system-deps.sh` (Debian package prometheus)")
    return path


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 90.0) -> Any:
    """Poll ``probe`` until it returns something truthy; a generous deadline only bounds a broken setup."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------- PromQL parsing
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)                                  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)                                  # matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    found = re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?", expr)
    return {m.group(1) for m in found if not m.group(2)} - _KEYWORDS


def dashboard_metric_names(dashboard: dict) -> set[str]:
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", var["definition"]))
    return names


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


# ------------------------------------------------------------------------------------------- unit tests
def test_metric_names_follow_prometheus_conventions():
    for m in METRICS:
        assert re.fullmatch(r"simclr_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name  # only counters, all counters
        assert not re.search(r"_(ms|milliseconds|percent|tflops|mb|gb)(_|$)", m.name), f"{m.name}: use base units"


def test_gpu_probe_without_nvml_reads_nothing_and_says_why(monkeypatch):
    """No NVIDIA driver here: the probe reports why in one line and reads nothing (the GPU series stay absent on such
    a worker, and training goes on); the same when nvidia-ml-py is missing."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the fallback is for hosts without one")
    probe = NvmlProbe(torch.device("cuda", 0))
    assert not probe.available and probe.read() == {}
    assert probe.reason and "\n" not in probe.reason
    monkeypatch.setitem(sys.modules, "pynvml", None)          # import pynvml -> ImportError
    missing = NvmlProbe(torch.device("cuda", 0))
    assert not missing.available and missing.read() == {} and missing.reason == "nvidia-ml-py (pynvml) is not installed"


def test_window_stats_arithmetic():
    stats = window_stats(seconds=2.0, steps=4, samples_per_step=32, data_wait_s=0.5, flops_per_sample=1e9)
    assert stats == pytest.approx({
        "simclr_samples_per_second": 64.0, "simclr_images_per_second": 128.0,  # two views per sample
        "simclr_step_duration_seconds": 0.5, "simclr_data_wait_ratio": 0.25,
        "simclr_model_flops_per_second": 6.4e10})
    assert "simclr_model_flops_per_second" not in window_stats(seconds=1, steps=1, samples_per_step=1, data_wait_s=0)


def test_promtool_check_rules():
    out = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_config():
    out = subprocess.run([binary("promtool"), "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    [job] = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_alerts_fire_as_documented(tmp_path):
    """``promtool test rules`` on synthetic series: each alert fires on its condition, after its ``for``, and
    not on healthy workers."""
    def s(labels: str, values: str) -> dict:
        return {"series": labels, "values": values}

    def alert(name: str, at: str, *expected: tuple[dict, str]) -> dict:
        return {"eval_time": at, "alertname": name, "exp_alerts": [
            {"exp_labels": labels, "exp_annotations": _annotations(name, labels, value)} for labels, value in expected]}

    w = 'run="a",node="n{r}",rank="{r}",WorkerId="w{r}"'
    worker = lambda r: {"run": "a", "rank": str(r), "node": f"n{r}"}  # noqa: E731
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [
            s(f"ray_simclr_samples_per_second{{{w.format(r=0)}}}", "100x30"),
            s(f"ray_simclr_samples_per_second{{{w.format(r=1)}}}", "100x30"),
            s(f"ray_simclr_samples_per_second{{{w.format(r=2)}}}", "30x30"),       # straggler
            s(f"ray_simclr_data_wait_ratio{{{w.format(r=0)}}}", "0.5x30"),          # input-bound
            s(f"ray_simclr_data_wait_ratio{{{w.format(r=1)}}}", "0.1x30"),
            s(f"ray_simclr_step{{{w.format(r=0)}}}", "0+10x10 100x20"),             # stalls after 10 minutes
        ], "alert_rule_test": [
            alert("SimclrWorkerSlow", "4m"),                                        # not yet: for 5m
            alert("SimclrWorkerSlow", "12m", ({**worker(2), "severity": "warning"}, "30.0")),
            alert("SimclrDataWaitHigh", "4m"),
            alert("SimclrDataWaitHigh", "12m", ({**worker(0), "severity": "warning"}, "50%")),
            alert("SimclrNoProgress", "12m"),                                       # progressing until 10m
            alert("SimclrNoProgress", "17m"),                                       # stalled < 10 minutes
            alert("SimclrNoProgress", "22m", ({"run": "a", "severity": "critical"}, "0")),
        ]},
    ]}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    out = subprocess.run([binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _annotations(alert: str, labels: dict[str, str], value: str) -> dict[str, str]:
    """The annotations the rules file renders for ``labels`` and the alert's formatted ``value`` (promtool compares
    them exactly, so this also proves the templates render)."""
    rule = next(r for r in rules() if r.get("alert") == alert)
    rendered = {}
    for key, text in rule["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        rendered[key] = re.sub(r"\{\{ \$value[^}]*\}\}", value, text)
    return rendered


def test_dashboard_references_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    used = dashboard_metric_names(dashboard)
    assert used <= exported_names(), f"not exported by simclr_dist.run.train.metrics: {sorted(used - exported_names())}"
    wanted = {"samples_per_second", "images_per_second", "data_wait_ratio", "loss", "learning_rate"}
    assert {f"ray_simclr_{w}" for w in wanted} <= used
    gpu = {m.exported for m in METRICS if m.gpu}               # every GPU series has a panel
    assert gpu <= used, sorted(gpu - used)


def test_rules_reference_only_exported_or_recorded_metrics():
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used <= exported_names() | recorded, f"{rule.get('record') or rule['alert']}: {used}"


def test_metric_name_parser():
    expr = ('simclr:x < on (run) group_left 0.5 * quantile by (run) (0.5, max by (a, b) '
            '(rate(ray_simclr_samples_total{run=~"$run", x="y{z}"}[$__rate_interval]))) and 1e9 > bool abc')
    assert metric_names(expr) == {"simclr:x", "ray_simclr_samples_total", "abc"}


def test_monitoring_section_documents_every_metric():
    guide = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [m.exported for m in METRICS if f"`{m.exported}`" not in guide]
    assert not missing, f"docs/monitoring.md lacks {missing}"


# ------------------------------------------------------------------------------------------- integration
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp) if "/api/" in url else resp.status
    except OSError:
        return None


@pytest.fixture
def prometheus(ray_cluster, tmp_path) -> Iterator[Callable[[str], list[dict]]]:
    """A real Prometheus scraping the session Ray via its service-discovery file; yields a query function."""
    node = ray_cluster._private.worker._global_node  # no public API names the session directory
    sd_file = Path(node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    wait_for("Ray's dashboard to write the service-discovery file", sd_file.exists)
    metrics_port = next(n["MetricsExportPort"] for n in ray_cluster.nodes() if n["Alive"])
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(sd_file)],
                                                                     "refresh_interval": "1s"}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{_free_port()}"
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={base[7:]}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        return _get(f"{base}/-/ready") == 200

    def node_target_up() -> bool:
        targets = (_get(f"{base}/api/v1/targets") or {}).get("data", {}).get("activeTargets", [])
        return any(t["scrapeUrl"].endswith(f":{metrics_port}/metrics") and t["health"] == "up" for t in targets)

    def query(promql: str) -> list[dict]:
        body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    try:
        wait_for("prometheus to be ready", ready)
        wait_for("the Ray node's metrics agent to be scraped via service discovery", node_target_up)
        yield query
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.ray
def test_worker_metrics_reach_prometheus(ray_cluster, prometheus, tiny_args):
    # a higher LR and a log point every 2 steps: the loss falls visibly and leaves many log windows. Prometheus samples
    # the gauges once a second (report and scrape interval 1 s), so how many windows it catches depends on the speed of
    # the machine: 4 epochs last several seconds even on a fast one (CI caught only 2 windows of a 2-epoch run, 2.2 s)
    epochs = 4
    pretrain.run(parse_config(tiny_args(RUN, "--epochs", str(epochs), "--base-lr", "0.3", "--log-every", "2")))
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path()).name
    sel = f'run="{RUN}",SessionName="{session}"'
    by_rank = lambda res: {r["metric"]["rank"]: float(r["value"][1]) for r in res}  # noqa: E731

    # samples/s of every rank, as exported by the workers and through the recording rule
    rate = prometheus(f"max by (run, rank, node) (max_over_time(ray_simclr_samples_per_second{{{sel}}}[1h]))")
    assert set(by_rank(rate)) == {"0", "1"} and all(v > 0 for v in by_rank(rate).values()), rate
    for series in rate:
        assert series["metric"]["run"] == RUN and series["metric"]["node"] == socket.gethostname()
    recorded = prometheus(f'max_over_time(simclr:worker_samples_per_second{{run="{RUN}"}}[1h])')
    assert set(by_rank(recorded)) == {"0", "1"}

    wait = by_rank(prometheus(f"max by (rank) (avg_over_time(ray_simclr_data_wait_ratio{{{sel}}}[1h]))"))
    assert set(wait) == {"0", "1"} and all(0 <= v <= 1 for v in wait.values())
    samples = by_rank(prometheus(f"max by (rank) (max_over_time(ray_simclr_samples_total{{{sel}}}[1h]))"))
    assert set(samples) == {"0", "1"} and all(0 < v <= epochs * (1437 // 64) * 32 for v in samples.values())
    lr = by_rank(prometheus(f"max by (rank) (max_over_time(ray_simclr_learning_rate{{{sel}}}[1h]))"))
    assert all(v > 0 for v in lr.values())
    epoch = by_rank(prometheus(f"max by (rank) (max_over_time(ray_simclr_epoch{{{sel}}}[1h]))"))
    assert epoch == {"0": float(epochs), "1": float(epochs)}
    assert not prometheus(f'{{__name__=~"ray_simclr_gpu_.*|ray_simclr_model_flops_per_second", {sel}}}[1h]')

    # the loss of each rank, as recorded (each distinct value is one log window's mean), goes down
    for series in prometheus(f"ray_simclr_loss{{{sel}}}[1h]"):
        points = [float(v) for _, v in series["values"]]
        windows = [v for i, v in enumerate(points) if i == 0 or v != points[i - 1]]
        third = max(1, len(windows) // 3)
        assert len(windows) >= 2, windows  # a fall needs two sampled windows; more are likely, not guaranteed
        assert statistics.mean(windows[-third:]) < statistics.mean(windows[:third]), windows
        assert windows[-1] < windows[0], windows
        print(f"\nrank {series['metric']['rank']} loss windows: {[round(w, 3) for w in windows]}")
    print(f"\nper-rank samples/s (max): {by_rank(rate)}\nper-rank data-wait share (mean): {wait}\n"
          f"per-rank samples_total: {samples}")
