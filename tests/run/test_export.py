"""``simclr-export --format torchvision|onnx|torchscript``: each file is loaded back by its real consumer (torchvision
with strict=True, onnxruntime, torch.jit.load) and gives the encoder's features on real digits images; the input
contract travels inside the file and beside it; a broken export is refused and nothing is written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from simclr_dist import export
from simclr_dist.config import PretrainConfig
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.run.store import interchange
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.store.interchange import EncoderFacts, parity_images
from simclr_dist.run.store.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_IMAGES = 64


def real_images(image_size: int, n: int = N_IMAGES) -> torch.Tensor:
    """``n`` digits test images through the evaluation transform: (n, 3, S, S) float32, normalised."""
    info = dataset_info("digits")
    data = load_dataset("digits", "test", image_size=image_size)
    transform = build_eval_transform(image_size, info.mean, info.std)
    return torch.stack([transform(data[i][0]) for i in range(0, 5 * n, 5)])


def write_run(tmp_path, **cfg_kw) -> tuple[str, torch.nn.Module, PretrainConfig]:
    """A digits run holding one complete checkpoint whose BatchNorm statistics come from real images (so eval-mode
    BN is not the identity and an export that gets BN wrong cannot pass)."""
    cfg = PretrainConfig(dataset="digits", epochs=3, **cfg_kw).resolved()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(real_images(cfg.image_size, 32))
    model.eval()
    run = tmp_path / "runs" / "r"
    save_checkpoint(str(run / "checkpoint_000002"), {
        "format_version": 2, "model": model.state_dict(), "optimizer": {}, "scaler": {}, "epoch": 2, "step": 20,
        "steps_per_epoch": 10, "config": cfg.to_dict(), "history": [{"epoch": 2, "loss": 4.5}]})
    return str(run), model, cfg


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The demo's network: resnet18 width 0.25, CIFAR stem, 24 px (what torchvision cannot hold)."""
    return write_run(tmp_path_factory.mktemp("demo"), image_size=24, width=0.25, cifar_stem=True)


def check_sidecar(out, fmt: str, cfg: PretrainConfig) -> dict:
    side = json.loads((out.parent / (out.name + ".json")).read_text())
    assert side["format"] == fmt and side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    info = dataset_info("digits")
    assert side["input"]["image_size"] == cfg.image_size and side["input"]["shape"] == ["N", 3, cfg.image_size,
                                                                                         cfg.image_size]
    assert side["input"]["mean"] == list(info.mean) and side["input"]["std"] == list(info.std)
    assert side["parity"]["images"] == N_IMAGES and side["parity"]["max_abs_diff"] <= side["parity"]["tolerance"]
    assert side["parity"]["source"].startswith("digits/test")
    return side


def test_onnx_runs_in_onnxruntime_with_the_encoders_features(demo_like, tmp_path, capsys):
    run, model, cfg = demo_like
    out = tmp_path / "enc.onnx"
    assert export.main([run, "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnx opset 17" in printed and "parity with the PyTorch encoder: max |diff|" in printed
    check_sidecar(out, "onnx", cfg)

    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["simclr_dist.image_size"] == "24" and json.loads(meta["simclr_dist.mean"]) == [0.3052] * 3
    assert json.loads(meta["simclr_dist.std"]) == [0.3236] * 3
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")  # the batch axis is free

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = real_images(24)  # (64, 3, 24, 24): other images than the export's own check (every 5th)
    with torch.no_grad():
        ref = model.encoder(x).numpy()  # (64, 32)
    for batch in (x, x[:3]):  # 64 at once, then 3: neither is the traced batch of 2
        got = session.run(["features"], {"images": batch.numpy()})[0]
        assert got.shape == (len(batch), model.feat_dim)
        np.testing.assert_allclose(got, ref[: len(batch)], rtol=0, atol=1e-4)
    assert np.abs(ref).max() > 0.1  # features worth comparing


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_reloads_with_its_input_contract_and_the_encoders_features(demo_like, tmp_path):
    run, model, cfg = demo_like
    out = tmp_path / "enc.ts"
    assert export.main([run, "--format", "torchscript", "--out", str(out)]) == 0
    check_sidecar(out, "torchscript", cfg)
    extra = {"simclr_dist.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    contract = json.loads(extra["simclr_dist.json"])["input"]
    assert contract["image_size"] == 24 and contract["mean"] == [0.3052] * 3 and contract["std"] == [0.3236] * 3
    x = real_images(24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.encoder(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded(x[:5]), model.encoder(x[:5]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_weights_load_strictly_into_torchvisions_resnet(tmp_path, suffix):
    run, model, cfg = write_run(tmp_path, image_size=32, width=1.0, cifar_stem=False)
    out = tmp_path / f"r18{suffix}"
    assert export.main([run, "--format", "torchvision", "--out", str(out)]) == 0
    check_sidecar(out, "torchvision", cfg)
    if suffix == ".safetensors":
        state = load_file(str(out))
        with safe_open(str(out), "pt") as f:
            header = f.metadata()
        assert header["simclr_dist.image_size"] == "32" and json.loads(header["simclr_dist.std"]) == [0.3236] * 3
    else:
        state = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    x = real_images(32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), model.encoder(x), rtol=0, atol=1e-5)


def test_bad_combinations_fail_in_one_line_and_write_nothing(demo_like, tmp_path, capsys):
    run, _, _ = demo_like
    cases = [
        (["--format", "torchvision", "--out", str(tmp_path / "x.safetensors")], ("width 0.25", "CIFAR stem")),
        (["--format", "onnx", "--out", str(tmp_path / "x.pt")], ("must end with .onnx",)),
        (["--format", "torchvision", "--out", str(tmp_path / "x.bin")], (".safetensors or .pt or .pth",)),
        (["--format", "torchscript", "--out", str(tmp_path / "x.onnx")], ("must end with .pt",)),
        (["--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--parity-images", "0"], ("--parity-images",)),
        ([str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "y.onnx")], ("no complete checkpoint",)),
    ]
    for argv, needles in cases:
        argv = argv if argv[0] != "--format" else [run, *argv]
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(n in err for n in needles), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    with pytest.raises(SystemExit) as exit_:  # a mistyped flag: one line with the close match
        export.main([run, "--format", "onnx", "--out", str(tmp_path / "z.onnx"), "--parity-imgs", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "(did you mean --parity-images?)" in err, err

    (tmp_path / "taken.onnx.json").write_text("{}")  # a sidecar in the way counts as the file existing
    assert export.main([run, "--format", "onnx", "--out", str(tmp_path / "taken.onnx")]) == 2
    assert "taken.onnx.json: exists" in capsys.readouterr().err and not (tmp_path / "taken.onnx").exists()


def test_an_export_that_computes_something_else_is_refused(demo_like, tmp_path, monkeypatch, capsys):
    """Exporters that bake BatchNorm in training mode (batch statistics): the file would load and run; only the
    parity check can tell, so nothing may be written."""
    run, _, _ = demo_like
    onnx_export, jit_trace = torch.onnx.export, torch.jit.trace
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: onnx_export(
        *a, **{**k, "training": torch.onnx.TrainingMode.TRAINING}))
    monkeypatch.setattr(torch.jit, "trace", lambda model, x, **k: jit_trace(model.train(), x, **k))
    for fmt, name in (("onnx", "bad.onnx"), ("torchscript", "bad.pt")):
        assert export.main([run, "--format", fmt, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{fmt} export of" in err and "fails parity: max |diff|" in err, err
        assert "nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_parity_images_fall_back_to_the_embedded_digits(tmp_path):
    facts = EncoderFacts(arch="resnet18", width=1.0, cifar_stem=True, image_size=32, mean=(0.5,) * 3,
                         std=(0.25,) * 3, feat_dim=512, dataset="cifar10", checkpoint="x", epoch=1)
    images, where = parity_images(facts, 7, data_root=str(tmp_path))  # no CIFAR-10 files there
    assert images.shape == (7, 3, 32, 32) and where.startswith("digits/test (embedded; cifar10 is not readable")
    raw = load_dataset("digits", "test", image_size=32)
    assert torch.allclose(images[0], (raw[0][0].float() / 255 - 0.5) / 0.25, atol=1e-6)  # the transform's contract
    assert interchange.PARITY_RTOL <= 1e-4
