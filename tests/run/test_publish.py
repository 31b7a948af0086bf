"""Encoders leaving the project as a published simclr-dist checkpoint: optimizer stripped, SHA-256 pinned and checked
on load, never overwritten. The torchvision, ONNX and TorchScript exports: tests/run/test_export.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from simclr_dist import export
from simclr_dist.config import PretrainConfig, PretrainedError
from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE, MANIFEST_FILE, load_checkpoint, save_checkpoint
from simclr_dist.run.store.pretrained import load_pretrained
from simclr_dist.run.store.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_run(tmp_path, **cfg_kw) -> tuple[str, torch.nn.Module]:
    """A run directory holding one complete checkpoint (with an optimizer state, as training writes it)."""
    cfg = PretrainConfig(dataset="digits", epochs=3, **cfg_kw).resolved()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, cfg.image_size, cfg.image_size))[1].sum().backward()
    opt.step()  # momentum buffers: the optimizer state a published copy must drop
    run = tmp_path / "runs" / "r"
    save_checkpoint(str(run / "checkpoint_000002"), {
        "format_version": 2, "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {},
        "epoch": 2, "step": 20, "steps_per_epoch": 10, "config": cfg.to_dict(),
        "history": [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.5}]})
    return str(run), model


def test_publish_strips_the_optimizer_pins_the_hash_and_loads(tmp_path, capsys):
    run, model = write_run(tmp_path, image_size=16, width=0.125)
    out = tmp_path / "weights" / "digits-r18"
    assert export.main([run, "--format", "simclr-dist", "--out", str(out), "--command", "python -m x",
                        "--evaluation", '{"knn_top1": 0.5}']) == 0
    assert "sha256" in capsys.readouterr().out
    state = load_checkpoint(str(out))
    assert "optimizer" not in state and state["epoch"] == 2 and state["published"]["command"] == "python -m x"
    digest = hashlib.sha256((out / CHECKPOINT_FILE).read_bytes()).hexdigest()
    assert (tmp_path / "weights" / "SHA256SUMS").read_text() == f"{digest}  digits-r18/{CHECKPOINT_FILE}\n"
    card = (out / "MODEL_CARD.md").read_text()
    assert digest in card and "knn_top1 | 0.5000" in card and "2 of 3 scheduled epochs" in card

    pre = load_pretrained(f"simclr-dist:{out}")
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(pre.encoder(x), model.encoder(x))

    # never overwritten: the same name again is refused, and the first publication is intact
    assert export.main([run, "--format", "simclr-dist", "--out", str(out)]) == 2
    assert "already published" in capsys.readouterr().err
    assert hashlib.sha256((out / CHECKPOINT_FILE).read_bytes()).hexdigest() == digest


def test_a_published_file_changed_behind_its_pin_is_refused(tmp_path):
    run, _ = write_run(tmp_path, image_size=16, width=0.125)
    out = tmp_path / "weights" / "enc"
    export.main([run, "--format", "simclr-dist", "--out", str(out)])
    # different weights, with the manifest rewritten to match them: only the pin can tell
    state = load_checkpoint(str(out))
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(str(tmp_path / "forged"), state)
    (out / CHECKPOINT_FILE).write_bytes((tmp_path / "forged" / CHECKPOINT_FILE).read_bytes())
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256((out / CHECKPOINT_FILE).read_bytes()).hexdigest()
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    load_checkpoint(str(out))  # the manifest check alone passes
    with pytest.raises(PretrainedError, match="differs from its pin"):
        load_pretrained(f"simclr-dist:{out}")


COMMITTED = {"simclr-fmnist-cpu-e12": ("fashion-mnist", 28), "simclr-fmnist-cpu-e24": ("fashion-mnist", 28),
             "simclr-digits-e20": ("digits", 24)}


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_encoders_committed_in_weights_load_with_their_pin_checked(name):
    """The repository's own published encoders: every file listed in weights/SHA256SUMS is there, hashes to its pin,
    and `--pretrained simclr-dist:weights/NAME` loads it to a network that turns real-sized images into features."""
    from pathlib import Path

    weights = Path(__file__).resolve().parents[2] / "weights"
    pins = dict(reversed(line.split("  ", 1)) for line in (weights / "SHA256SUMS").read_text().splitlines())
    assert sorted(p.split("/")[0] for p in pins) == sorted(COMMITTED)  # a new encoder gets a row above
    file = weights / name / CHECKPOINT_FILE
    assert hashlib.sha256(file.read_bytes()).hexdigest() == pins[f"{name}/{CHECKPOINT_FILE}"]
    assert pins[f"{name}/{CHECKPOINT_FILE}"] in (weights / name / "MODEL_CARD.md").read_text()
    pre = load_pretrained(f"simclr-dist:{weights / name}")
    dataset, size = COMMITTED[name]
    assert load_checkpoint(str(weights / name))["config"]["dataset"] == dataset
    with torch.no_grad():
        feats = pre.encoder.eval()(torch.randn(3, 3, size, size))
    assert feats.shape[0] == 3 and torch.isfinite(feats).all() and feats.std() > 0
