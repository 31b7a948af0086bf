"""Encoders leave the project as a *published* simclr-dist checkpoint, or as a torchvision state dict (this module);
ONNX, TorchScript and the checked torchvision export with its input contract live in :mod:`.interchange`.

Why publish rather than copy a checkpoint: a training checkpoint carries the optimizer (twice the weights) and
can be overwritten by a rerun; a published one holds the network, its config and history only, is written once,
and its SHA-256 is pinned in ``SHA256SUMS`` beside it. ``--pretrained simclr-dist:DIR`` checks that pin on load
(:func:`check_pinned`), so a file swapped or damaged in the repository is refused in one line, not trained from.

The torchvision form is the encoder's state dict under torchvision's own names (``conv1``, ``bn1``, ``layer1.0``
...; our ResNet mirrors torchvision's modules); it loads with ``strict=True`` into
``torchvision.models.resnet18/34/50()`` after ``model.fc = torch.nn.Identity()``, where the architecture matches
(width 1, the ImageNet stem). Any other network is refused in one line naming why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import datetime, timezone
from typing import Any

import torch

from simclr_dist import storage
from simclr_dist.config import PretrainConfig, PretrainedError
from simclr_dist.run.store.checkpoint import (CHECKPOINT_FILE, MANIFEST_FILE, CheckpointError, latest_checkpoint,
                                             load_checkpoint, read_complete, save_checkpoint)

PINS_FILE = "SHA256SUMS"
PUBLISHED_FIELDS = ("model", "config", "epoch", "step", "history", "steps_per_epoch")


class PublishError(ValueError):
    """A source that cannot be published or exported, or a destination that would be overwritten."""


def resolve_checkpoint(source: str) -> str:
    """A checkpoint directory, or a run directory's newest complete checkpoint; one line when there is none."""
    if read_complete(source) is not None:
        return source
    latest = latest_checkpoint(source)
    if latest is None:
        raise PublishError(f"{source}: no complete checkpoint (a checkpoint dir with {MANIFEST_FILE}, or a run "
                           "dir holding one)")
    return latest


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def publish(source: str, out: str, *, command: str = "", evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (a new directory): the checkpoint's network without its optimizer, a manifest, and a model
    card; pin its SHA-256 in ``SHA256SUMS`` of the parent directory. Returns the card's facts."""
    src = resolve_checkpoint(source)
    if storage.exists(storage.join(out, MANIFEST_FILE)) or storage.exists(storage.join(out, CHECKPOINT_FILE)):
        raise PublishError(f"{out}: already published; publish under a new name (nothing is overwritten)")
    try:
        state = load_checkpoint(src)
    except CheckpointError as e:
        raise PublishError(str(e)) from None
    if "model" not in state or "config" not in state:
        raise PublishError(f"{src}: not a pretraining checkpoint (no model/config)")
    cfg = PretrainConfig.from_dict(state["config"])
    facts = {"source": src, "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "commit": git_commit(), "command": command, "dataset": cfg.dataset, "arch": cfg.arch,
             "width": cfg.width, "image_size": cfg.image_size, "cifar_stem": cfg.cifar_stem,
             "epochs_trained": state["epoch"], "epochs_scheduled": cfg.epochs, "steps": state["step"],
             "batch_size": cfg.batch_size, "evaluation": evaluation or {}}
    published = {k: state[k] for k in PUBLISHED_FIELDS if k in state}
    published.update(format_version=state.get("format_version", 1), published=facts)
    save_checkpoint(out, published)
    digest = storage.read_json(storage.join(out, MANIFEST_FILE))["sha256"]
    facts["sha256"] = digest
    pin(out, digest)
    storage.write_bytes(storage.join(out, "MODEL_CARD.md"), model_card(out, facts, state.get("history", [])).encode())
    return facts


def pin(out: str, digest: str) -> None:
    """Add ``<digest>  <name>/checkpoint.pt`` to the parent's ``SHA256SUMS`` (a name already pinned is refused)."""
    parent, name = os.path.split(out.rstrip("/"))
    pins_uri = storage.join(parent or ".", PINS_FILE)
    lines = storage.read_bytes(pins_uri).decode().splitlines() if storage.exists(pins_uri) else []
    entry = f"{name}/{CHECKPOINT_FILE}"
    if any(line.split()[-1] == entry for line in lines if line.strip()):
        raise PublishError(f"{pins_uri}: {entry} is already pinned; publish under a new name")
    storage.write_bytes(pins_uri, "\n".join([*lines, f"{digest}  {entry}"]).encode() + b"\n")


def check_pinned(checkpoint_uri: str) -> str | None:
    """The pinned SHA-256 of a published checkpoint, verified against the file; ``None`` when nothing pins it.
    :class:`PretrainedError` (one line) when the file's hash differs from its pin."""
    parent, name = os.path.split(checkpoint_uri.rstrip("/"))
    pins_uri = storage.join(parent or ".", PINS_FILE)
    if not storage.exists(pins_uri):
        return None
    entry = f"{name}/{CHECKPOINT_FILE}"
    pinned = [line.split()[0] for line in storage.read_bytes(pins_uri).decode().splitlines()
              if line.strip() and line.split()[-1] == entry]
    if not pinned:
        return None
    actual = hashlib.sha256(storage.read_bytes(storage.join(checkpoint_uri, CHECKPOINT_FILE))).hexdigest()
    if actual != pinned[0]:
        raise PretrainedError(f"{checkpoint_uri}: SHA-256 {actual[:16]}... differs from its pin {pinned[0][:16]}... "
                              f"in {pins_uri}; the published file was changed or damaged")
    return actual


def model_card(out: str, facts: dict[str, Any], history: list[dict[str, Any]]) -> str:
    ev = facts["evaluation"]
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ev.items())
    last = history[-1] if history else {}
    return f"""# {os.path.basename(out.rstrip('/'))}: SimCLR {facts['arch']} x{facts['width']:g} on {facts['dataset']}

- SHA-256 of `checkpoint.pt`: `{facts['sha256']}` (pinned in `{PINS_FILE}` beside this folder; checked on load)
- Load: `--pretrained simclr-dist:{out}` (pretraining, `simclr_dist.experiments`, `simclr_dist.evaluate`)
- Network: {facts['arch']}, width {facts['width']:g}, {'CIFAR' if facts['cifar_stem'] else 'ImageNet'} stem,
  {facts['image_size']} px inputs; projection head included; no optimizer state
- Training: {facts['epochs_trained']} of {facts['epochs_scheduled']} scheduled epochs ({facts['steps']} steps,
  batch {facts['batch_size']}); last epoch's loss {last.get('loss', float('nan')):.4f}
- Made by: `{facts['command'] or '(not given)'}`
- Published {facts['published_at']} by simclr-dist at commit `{facts['commit'] or 'unknown'}` from
  `{facts['source']}`

| evaluation | value |
| --- | --- |
{rows or '| (none given) | - |'}
"""


TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")


def torchvision_arch(arch: str, width: float, cifar_stem: bool, where: str) -> str:
    """The torchvision constructor that holds this encoder exactly; a :class:`PublishError` naming every reason
    when none does (another width, the CIFAR stem, an architecture torchvision lacks)."""
    why = ([f"width {width:g} (torchvision builds width 1)"] if width != 1 else []) + (
        ["the CIFAR stem (3x3 conv, no max-pool; torchvision has the 7x7 ImageNet stem)"] if cifar_stem else []) + (
        [f"arch {arch}"] if arch not in TORCHVISION_ARCHS else [])
    if why:
        raise PublishError(f"{where}: torchvision's {arch} cannot hold this encoder: {'; '.join(why)}; "
                           "export --format onnx, torchscript or simclr-dist instead")
    return arch


def torchvision_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """(the encoder's state dict under torchvision's names, the torchvision constructor name); refuses a
    network torchvision does not build (another width, the CIFAR stem) in one line."""
    state = load_checkpoint(resolve_checkpoint(source))
    cfg = PretrainConfig.from_dict(state["config"])
    arch = torchvision_arch(cfg.arch, cfg.width, cfg.cifar_stem, source)
    encoder = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    return encoder, arch
