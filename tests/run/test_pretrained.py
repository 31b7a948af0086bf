"""Importers of published checkpoints (simclr_dist.run.store.pretrained), each checked against a source model written here in
that format's own layout (random weights, never downloaded): the imported encoder must compute the *same features*
as the source network, not merely load. Plus the published R50 1x/2x/4x parameter counts, the one-line errors and
the evaluate CLI end to end on digits with ``--pretrained``."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torchvision
from torch import nn

from simclr_dist import evaluate as ev
from simclr_dist.run.eval.jobs import pretrained_eval_data, pretrained_results_dir
from simclr_dist.config import PretrainConfig
from simclr_dist.data.datasets import dataset_info
from simclr_dist.core.models import build_backbone, count_parameters
from simclr_dist.config import PretrainedError, parse_weights_spec
from simclr_dist.run.store.pretrained import IMAGENET_MEAN_STD, BNFreeProjectionHead, load_pretrained
from simclr_dist.run.store.weights import compare_state_dict, import_encoder, infer_resnet
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.store.weights import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters: a key mix-up between BN tensors would show in the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- source layouts, written here
class _Bottleneck(nn.Module):
    """tonylins/simclr-converter ``resnet_wider.Bottleneck``: 1x1 -> 3x3 (stride) -> 1x1 (x4), as TF SimCLR v1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class WiderResNet50(nn.Module):
    """The converter's ``resnet50x{1,2,4}``: *every* channel count (stem included) times ``width_mult``, + ``fc``."""

    def __init__(self, width_mult: int = 1, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64 * width_mult
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64 * width_mult, 3)
        self.layer2 = self._make_layer(128 * width_mult, 4, stride=2)
        self.layer3 = self._make_layer(256 * width_mult, 6, stride=2)
        self.layer4 = self._make_layer(512 * width_mult, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * 4 * width_mult, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class SpijkervetSimCLR(nn.Module):
    """Spijkervet/SimCLR ``simclr.SimCLR``: torchvision encoder with ``fc = Identity`` + bias-free MLP, no BN."""

    def __init__(self, encoder: nn.Module, projection_dim: int, n_features: int):
        super().__init__()
        self.encoder = encoder
        self.encoder.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(n_features, n_features, bias=False), nn.ReLU(),
                                       nn.Linear(n_features, projection_dim, bias=False))

    def forward(self, x):
        h = self.encoder(x)
        return h, self.projector(h)


def tiny_cfg() -> PretrainConfig:
    return PretrainConfig(dataset="digits", image_size=16, width=0.125, epochs=3).resolved()


def write_checkpoint(directory, epoch: int = 1, seed: int = 0) -> tuple[str, nn.Module]:
    cfg = tiny_cfg()
    torch.manual_seed(seed)
    model = randomize_bn(build_model(cfg), seed)
    save_checkpoint(str(directory), {
        "format_version": 1, "model": model.state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "epoch": epoch, "step": 10 * epoch, "steps_per_epoch": 10, "config": cfg.to_dict(), "history": []})
    return str(directory), model


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[str, nn.Module]:
    """A torchvision ResNet-18 (random weights, fc included) saved as a plain state dict."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18())
    path = str(tmp_path_factory.mktemp("tv") / "resnet18-random.pth")
    torch.save(model.state_dict(), path)
    return path, model


X = torch.rand(2, 3, 64, 64)


# ---------------------------------------------------------------------------- exact mapping, per format
@pytest.mark.parametrize("width", [1, 2])
def test_simclr_v1_converted_features_match(tmp_path, width):
    torch.manual_seed(width)
    src = randomize_bn(WiderResNet50(width)).eval()
    path = tmp_path / f"resnet50-{width}x.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    del src.fc  # not part of the encoder (the converter's supervised linear head)
    lines = []
    pre = load_pretrained(f"simclr-v1:{path}", log=lines.append)
    assert (pre.arch, pre.width, pre.cifar_stem, pre.feat_dim) == ("resnet50", width, False, 2048 * width)
    assert pre.head is None and pre.normalization is None and pre.report.complete
    assert pre.report.dropped == ["fc.weight", "fc.bias"]
    assert pre.num_params == count_parameters(src)
    with torch.no_grad():
        assert_same(pre.encoder(X), src.features(X))
    line = lines[-1]
    assert f"resnet50 width {width}x" in line and "input normalisation: none (pixels in [0, 1]" in line
    assert f"{pre.num_params:,}" in line and "\n" not in line
    assert pre.mean_std() == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert all(p.requires_grad for p in pre.encoder.parameters())  # fine-tunable


@pytest.mark.parametrize("width, published", [(1, 23.5e6), (2, 94e6), (4, 375e6)])
def test_simclr_v1_widths_and_published_parameter_counts(width, published):
    """R50 1x/2x/4x (SimCLR Table 6: 24M/94M/375M; 23.5M without fc): built on the meta device from the
    converter's layout, so the 375M-parameter check costs no memory."""
    with torch.device("meta"):
        src = WiderResNet50(width)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    assert infer_resnet(state, "test") == ("resnet50", width, False)
    encoder, report, *_ = import_encoder(state, strict=True, where="test")
    assert report.complete and len(report.loaded) == len(state)
    n = count_parameters(encoder)
    assert n == count_parameters(src) - count_parameters(src.fc)
    assert abs(n - published) / published < 0.005, n
    with torch.device("meta"):
        ours, _ = build_backbone("resnet50", width=width)
    assert count_parameters(ours) == n


@pytest.mark.parametrize("arch, with_fc", [("resnet18", False), ("resnet50", True)])
def test_spijkervet_features_and_bn_free_head_match(tmp_path, arch, with_fc):
    torch.manual_seed(1)
    n_features = 512 if arch == "resnet18" else 2048
    src = SpijkervetSimCLR(randomize_bn(getattr(torchvision.models, arch)()), 64, n_features).eval()
    state = src.state_dict()
    if with_fc:  # versions that kept the classifier: it must be dropped, not reported as unexpected
        state["encoder.fc.weight"] = torch.zeros(1000, n_features)
        state["encoder.fc.bias"] = torch.zeros(1000)
        state = {f"module.{k}": v for k, v in state.items()}  # saved from DataParallel
    path = tmp_path / "checkpoint_100.tar"
    torch.save(state, path)
    pre = load_pretrained(f"spijkervet:{path}")
    assert (pre.arch, pre.width, pre.feat_dim, pre.normalization) == (arch, 1.0, n_features, None)
    assert isinstance(pre.head, BNFreeProjectionHead) and pre.report.complete
    assert pre.report.dropped == (["encoder.fc.weight", "encoder.fc.bias"] if with_fc else [])
    with torch.no_grad():
        h, z = src(X)
        assert_same(pre.encoder(X), h)
        assert_same(pre.head(pre.encoder(X)), z)


def test_torchvision_features_match(r18_file):
    path, src = r18_file
    lines = []
    pre = load_pretrained(f"torchvision:{path}", log=lines.append)
    assert (pre.arch, pre.width, pre.head, pre.normalization) == ("resnet18", 1.0, None, IMAGENET_MEAN_STD)
    src = torchvision.models.resnet18()
    src.load_state_dict(torch.load(path))
    src.fc = nn.Identity()
    with torch.no_grad():
        assert_same(pre.encoder(X), src.eval()(X))
    assert "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)" in lines[-1]
    assert "11.18M encoder parameters" in lines[-1]


def test_torchvision_name_looks_in_hub_cache_never_downloads(r18_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PretrainedError, match="not in the torch hub cache .* no download is attempted: fetch "
                                              r"https://download.pytorch.org/models/resnet18-f37072fd.pth"):
        load_pretrained("torchvision:resnet18")
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.symlink(r18_file[0], tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    pre = load_pretrained("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert pre.arch == "resnet18" and pre.uri.endswith("resnet18-f37072fd.pth")


def test_simclr_dist_checkpoint_and_run_dir(tmp_path):
    ckpt, src = write_checkpoint(tmp_path / "run" / "checkpoint_000002", epoch=2)
    write_checkpoint(tmp_path / "run" / "checkpoint_000001", epoch=1, seed=1)
    for spec in (f"simclr-dist:{ckpt}", f"simclr-dist:{tmp_path / 'run'}"):  # a run dir: its latest checkpoint
        pre = load_pretrained(spec)
        assert pre.uri == ckpt and pre.epoch == 2 and (pre.arch, pre.width, pre.cifar_stem) == ("resnet18", 0.125, True)
        assert pre.normalization == (dataset_info("digits").mean, dataset_info("digits").std)
        x = torch.rand(3, 3, 16, 16)
        with torch.no_grad():
            h, z = src.eval()(x)
            assert_same(pre.encoder(x), h)
            assert_same(pre.head(pre.encoder(x)), z)


# ---------------------------------------------------------------------------- verification and one-line errors
def test_partial_loads_refused_under_strict_with_one_line(r18_file, tmp_path):
    path, src = r18_file
    state = dict(src.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    del state["layer4.1.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(PretrainedError) as e:
        load_pretrained(f"torchvision:{bad}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--pretrained torchvision:{bad}: does not match resnet18 width 1x: ")
    assert "1 missing key (first: layer4.1.bn2.running_var)" in msg
    assert "1 unexpected key (first: layer5.0.conv1.weight)" in msg
    assert "1 shape mismatch (first: layer2.0.conv1.weight file [128, 32, 3, 3] vs model [128, 64, 3, 3])" in msg
    assert "--no-strict loads the 118 matching tensors" in msg

    lines = []
    pre = load_pretrained(f"torchvision:{bad}", strict=False, log=lines.append)
    assert lines[0].startswith("[pretrained] warning: partial load") and "PARTIAL 118 tensors loaded" in lines[1]
    assert torch.equal(pre.encoder.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert pre.encoder.layer2[0].conv1.weight.shape == (128, 64, 3, 3)  # kept its initialisation


@pytest.mark.parametrize("content, spec_format, needle", [
    (b"\x00not a pickle at all", "torchvision", "cannot read as a PyTorch weight file (UnpicklingError: corrupt"),
    ("truncated", "torchvision", "cannot read as a PyTorch weight file (RuntimeError: PytorchStreamReader"),
    ({"args": argparse.Namespace(lr=1)}, "torchvision", "Unsupported global: GLOBAL argparse.Namespace"),
    ({"weight": torch.zeros(3)}, "torchvision", "not a ResNet encoder (no 3-channel 'conv1.weight'"),
    ({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)}},
     "simclr-v1", "unsupported ResNet layout (basic blocks per stage [1, 0, 0, 0])"),
    ("spijkervet-file", "simclr-v1", "not a ResNet encoder (no 3-channel 'conv1.weight'; keys start encoder."),
    ("torchvision-file", "spijkervet", "not a Spijkervet/SimCLR checkpoint (no 'encoder.*' keys"),
    ([1, 2, 3], "torchvision", "not a state dict (got list)"),
    ("missing", "simclr-v1", "no such file"),
])
def test_bad_files_one_line_error(tmp_path, r18_file, content, spec_format, needle):
    path = tmp_path / "w.pth"
    if content == "spijkervet-file":
        torch.save({f"encoder.{k}": v for k, v in torch.load(r18_file[0]).items()}, path)
    elif content == "torchvision-file":
        path = r18_file[0]
    elif content == "truncated":  # an interrupted download
        path.write_bytes(open(r18_file[0], "rb").read()[: 1 << 20])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "missing":
        torch.save(content, path)
    with pytest.raises(PretrainedError) as e:
        load_pretrained(f"{spec_format}:{path}")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("--pretrained ")


def test_spec_parsing():
    assert parse_weights_spec("simclr-dist:s3://bucket/runs/r/checkpoint_000001") == (
        "simclr-dist", "s3://bucket/runs/r/checkpoint_000001")
    for spec, needle in [("swav:/x.pth", "unknown format 'swav'"), ("/x.pth", "expected FORMAT:PATH_OR_URI")]:
        with pytest.raises(PretrainedError, match=needle):
            parse_weights_spec(spec)


def test_compare_state_dict_tolerates_missing_bn_counters():
    with torch.device("meta"):
        enc, _ = build_backbone("resnet18", width=0.25)
    state = {k: v for k, v in enc.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert compare_state_dict(enc, state).complete


# ---------------------------------------------------------------------------- the evaluate CLI, end to end
def test_evaluate_cli_pretrained_simclr_dist_same_as_checkpoint(tmp_path, capsys):
    ckpt, _ = write_checkpoint(tmp_path / "runs" / "r" / "checkpoint_000001")
    assert ev.main(["--pretrained", f"simclr-dist:{ckpt}", "--protocols", "knn"]) == 0
    out = capsys.readouterr().out
    assert "[pretrained] simclr-dist:" in out and "resnet18 width 0.125x (CIFAR 3x3 stem)" in out
    result = tmp_path / "runs" / "r" / "eval" / "checkpoint_000001" / "knn.json"
    r = json.loads(result.read_text())  # the run's results of that checkpoint, as --checkpoint
    assert r["checkpoint"] == ckpt and r["checkpoint_epoch"] == 1 and r["pretrained"]["format"] == "simclr-dist"
    assert ev.main(["--checkpoint", ckpt, "--protocols", "knn", "--force"]) == 0
    assert json.loads(result.read_text())["top1"] == r["top1"]


def test_evaluate_cli_pretrained_torchvision_on_digits(r18_file, tmp_path, capsys):
    res = tmp_path / "res"
    args = ["--pretrained", f"torchvision:{r18_file[0]}", "--dataset", "digits", "--image-size", "16",
            "--protocols", "knn", "--results-dir", str(res)]
    assert ev.main(args) == 0
    out = capsys.readouterr().out
    assert "input normalisation: mean (0.485, 0.456, 0.406)" in out and "resnet18-random.pth" in out
    r = json.loads((res / "eval" / "knn.json").read_text())
    assert r["dataset"] == "digits" and r["image_size"] == 16 and r["checkpoint_epoch"] is None
    assert r["pretrained"]["normalization"] == {"mean": list(IMAGENET_MEAN_STD[0]), "std": list(IMAGENET_MEAN_STD[1])}
    assert 0.1 < r["top1"] <= 1 and r["label_count"] == 1437
    assert ev.main(args) == 0 and "already evaluated" in capsys.readouterr().out


def test_evaluate_honours_unnormalised_inputs_of_simclr_v1(tmp_path):
    """SimCLR v1 wants raw [0, 1] pixels: the eval data's transform must not apply the dataset's mean/std."""
    torch.manual_seed(0)
    enc, _ = build_backbone("resnet50", width=0.125)
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": enc.state_dict()}, path)
    ecfg = ev.parse_args(["--pretrained", f"simclr-v1:{path}", "--dataset", "digits", "--image-size", "16"]).validate()
    pre = load_pretrained(ecfg.pretrained)
    data, _ = pretrained_eval_data(pre, ecfg)
    assert (data.mean, data.std, data.image_size) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 16)
    x = torch.stack([data.eval_transform()(data.test[i][0]) for i in range(20)])
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9  # raw pixels
    assert pretrained_results_dir(pre, data, ecfg).endswith(
        os.path.join("runs", "pretrained-eval", "simclr-v1-r50.pth-digits-16px", "eval"))


@pytest.mark.parametrize("args, needle", [
    (["--pretrained", "simclr-v1:/x.pth"], "--dataset: required with --pretrained simclr-v1"),
    (["--pretrained", "moco:/x.pth", "--dataset", "digits"], "unknown format 'moco'"),
    (["--pretrained", "simclr-v1:/nonexistent/x.pth", "--dataset", "digits"], "no such file"),
    (["--pretrained", "torchvision:BAD", "--dataset", "digits", "--checkpoint", "/c"], "exactly one of"),
    (["--checkpoint", "/c", "--dataset", "digits"], "--dataset: only applies with --pretrained"),
    (["--pretrained", "simclr-v1:/x.pth", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--pretrained", "torchvision:{bad}", "--dataset", "digits"], "does not match resnet18 width 1x"),
])
def test_evaluate_cli_bad_pretrained_exit_2_one_line(r18_file, tmp_path, capsys, args, needle):
    state = torch.load(r18_file[0])
    state["layer1.0.bn1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    assert ev.main([a.replace("{bad}", str(tmp_path / "bad.pth")) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


# ---------------------------------------------------------------------------- init of a pretraining run
def test_init_from_pretrained_copies_encoder_and_matching_head(tmp_path, r18_file):
    from simclr_dist.config import ConfigError
    from simclr_dist.run.store.pretrained import init_from_pretrained

    ckpt, src = write_checkpoint(tmp_path / "checkpoint_000001")
    torch.manual_seed(5)
    model = build_model(tiny_cfg())
    lines = []
    init_from_pretrained(model, f"simclr-dist:{ckpt}", log=lines.append)
    for (k, a), b in zip(model.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), k
    assert "projection head copied from the import" in lines[-1]

    with pytest.raises(PretrainedError, match="the run's encoder differs from the import .resnet18 width 1x, "
                                              "ImageNet stem.: .*; pass the matching --arch/--width/--cifar-stem"):
        init_from_pretrained(build_model(tiny_cfg()), f"torchvision:{r18_file[0]}")
    big = build_model(PretrainConfig(dataset="digits", width=1.0, cifar_stem=False).resolved())
    init_from_pretrained(big, f"torchvision:{r18_file[0]}", log=lines.append)
    assert torch.equal(big.encoder.layer4[1].conv2.weight, r18_file[1].layer4[1].conv2.weight)
    assert "projection head fresh (the import has no projection head)" in lines[-1]

    assert PretrainConfig(pretrained=f"simclr-dist:{ckpt}").validate().pretrained_strict is True
    with pytest.raises(ConfigError, match="unknown format 'byol'"):
        PretrainConfig(pretrained="byol:/x.pth").validate()
