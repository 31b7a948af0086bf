"""Import published encoders: ``--pretrained FORMAT:PATH_OR_URI`` -> the project's :class:`ResNetEncoder`.

So that the evaluation code can be checked against published numbers, and our runs compared with published
checkpoints by the same code, four weight layouts load into the same encoder (torchvision key names, every stage
widened by ``width``):

=============  ==================================================================  =====================
format         file                                                                input normalisation
=============  ==================================================================  =====================
simclr-v1      google-research SimCLR v1 R50-1x/2x/4x converted by tonylins/        none: pixels in [0, 1]
               simclr-converter: ``{'state_dict': <ResNet-50, all channels          (the TF models were
               widened 1x/2x/4x>}``; width read from conv1 (64/128/256 channels);   trained that way)
               ``fc.*`` (the supervised linear head) is dropped
spijkervet     Spijkervet/SimCLR ``checkpoint_*.tar``: ``encoder.*`` (torchvision  none: pixels in [0, 1]
               ResNet, ``encoder.fc.*`` dropped if present) + ``projector.0.weight``  (its transforms end in
               / ``projector.2.weight`` (no biases, no BN) -> :class:`BNFreeProjec-  ``ToTensor()``)
               tionHead`
torchvision    torchvision ImageNet ResNet-18/34/50 weights: a local file, or a      ImageNet mean/std
               model/weights name looked up in the torch hub cache (never
               downloaded); ``fc.*`` dropped
simclr-dist    our own checkpoint directory (or a run directory: its latest complete  the pretraining
               checkpoint), local path or ``s3://``/``gs://`` URI                    dataset's mean/std
=============  ==================================================================  =====================

Architecture (resnet18/34/50), width and stem are inferred from the tensors, never from the file name. Every
import is verified against the model it builds: key coverage and shapes, reported as *one line* naming the first
missing key, unexpected key and shape mismatch. ``strict=True`` (the default) refuses a partial load; with
``strict=False`` the matching tensors are loaded and the rest keeps its random initialisation (the line is still
printed). After loading, :meth:`PretrainedEncoder.describe` gives architecture, width, parameter count and the
input normalisation in force; the evaluation pipeline applies that normalisation instead of the dataset's.

External files are read with ``torch.load(weights_only=True)``: a weight file is data and must not run code.
"""

from __future__ import annotations

import hashlib

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simclr_dist.config import PretrainedError, parse_weights_spec
from simclr_dist.console import Log
from simclr_dist.core.models import ResNetEncoder, count_parameters
from simclr_dist import storage
from simclr_dist.run.store.weights import (
    LoadReport,
    compare_state_dict,
    first_line,
    import_encoder,
    load_verified,
    read_weights,
    split_fc,
    state_dict_of,
)

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


# ---------------------------------------------------------------------------- the imported encoder
@dataclass
class PretrainedEncoder:
    """An imported encoder (``(N, 3, H, W) -> (N, feat_dim)``) and what the evaluation pipeline must know."""

    encoder: ResNetEncoder
    head: nn.Module | None  # projection head g(.) when the file has one
    arch: str
    width: float
    cifar_stem: bool
    feat_dim: int
    normalization: Normalization | None  # (mean, std) the encoder expects; None: raw pixels in [0, 1]
    source: str  # the spec as given, FORMAT:PATH_OR_URI
    format: str
    uri: str  # the file or checkpoint directory actually read
    report: LoadReport
    checkpoint: dict[str, Any] | None = None  # simclr-dist: epoch, step, config of the checkpoint

    @property
    def num_params(self) -> int:
        return count_parameters(self.encoder)

    def weights_digest(self) -> str:
        """16 hex digits of SHA-256 over the encoder's (and head's) tensors, names, dtypes and shapes: what the import
        *is*, wherever it was read from (a published encoder checked out at another path has the same digest)."""
        if "_digest" in self.__dict__:  # computed once (every cell of a study names its runs with it)
            return self.__dict__["_digest"]
        h = hashlib.sha256()
        for prefix, module in (("encoder.", self.encoder), ("head.", self.head)):
            if module is None:
                continue
            for name, t in sorted(module.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        self.__dict__["_digest"] = h.hexdigest()[:16]
        return self.__dict__["_digest"]

    @property
    def epoch(self) -> int | None:
        return None if self.checkpoint is None else self.checkpoint.get("epoch")

    def mean_std(self) -> Normalization:
        """The (mean, std) to put in ``Normalize``: the identity (0, 1) when the encoder wants [0, 1] pixels."""
        return self.normalization or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def normalization_text(self) -> str:
        if self.normalization is None:
            return "none (pixels in [0, 1], no mean/std)"
        mean, std = self.normalization
        return f"mean {_fmt3(mean)} std {_fmt3(std)}"

    def describe(self) -> str:
        """One line: architecture, width, parameter count, features, head and the input normalisation."""
        head = "none" if self.head is None else f"{type(self.head).__name__} ({count_parameters(self.head) / 1e6:.2f}M)"
        dropped = f", dropped {', '.join(self.report.dropped)}" if self.report.dropped else ""
        coverage = ("all" if self.report.complete else "PARTIAL") + f" {len(self.report.loaded)} tensors loaded"
        return (f"[pretrained] {self.source}: {self.arch} width {self.width:g}x "
                f"({'CIFAR 3x3' if self.cifar_stem else 'ImageNet 7x7'} stem), {self.num_params / 1e6:.2f}M encoder "
                f"parameters ({self.num_params:,}), {self.feat_dim}-d features, head: {head}; input normalisation: "
                f"{self.normalization_text()}; {coverage}{dropped}")

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for result files."""
        return {"format": self.format, "source": self.source, "uri": self.uri, "arch": self.arch,
                "width": self.width, "cifar_stem": self.cifar_stem, "feat_dim": self.feat_dim,
                "encoder_params": self.num_params, "head": None if self.head is None else type(self.head).__name__,
                "normalization": None if self.normalization is None else {"mean": list(self.normalization[0]),
                                                                           "std": list(self.normalization[1])},
                "complete": self.report.complete, "tensors_loaded": len(self.report.loaded),
                "dropped": list(self.report.dropped)}


def _fmt3(v: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"


class BNFreeProjectionHead(nn.Sequential):
    """Spijkervet/SimCLR's projector ``Linear(no bias) -> ReLU -> Linear(no bias)``, without the BatchNorm of our
    :class:`~simclr_dist.core.models.ProjectionHead`; its child names ``0``/``2`` are the file's ``projector.0/2``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=False))


def _load_simclr_v1(path: str, where: str, strict: bool) -> dict[str, Any]:
    state = state_dict_of(read_weights(path, where), where)
    enc_state, dropped = split_fc(state)
    encoder, report, arch, width, stem = import_encoder(enc_state, strict=strict, where=where, dropped=dropped)
    return dict(encoder=encoder, head=None, arch=arch, width=width, cifar_stem=stem, normalization=None,
                report=report, uri=path)


def _load_spijkervet(path: str, where: str, strict: bool) -> dict[str, Any]:
    state = state_dict_of(read_weights(path, where), where, containers=("state_dict", "model"))
    if not any(k.startswith("encoder.") for k in state):
        raise PretrainedError(f"{where}: not a Spijkervet/SimCLR checkpoint (no 'encoder.*' keys; keys start "
                              f"{', '.join(list(state)[:3])})")
    enc_state, dropped = split_fc(state, "encoder.")
    head_state = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    others = {k: v for k, v in state.items() if not k.startswith(("encoder.", "projector."))}
    encoder, report, arch, width, stem = import_encoder({**enc_state, **others}, strict=strict, where=where,
                                                        dropped=dropped)
    # the projector: Linear(d, d, bias=False) -> ReLU -> Linear(d, p, bias=False), no BN
    w0, w2 = head_state.get("0.weight"), head_state.get("2.weight")
    head_report = LoadReport()
    head = None
    if w0 is not None and w2 is not None and w0.dim() == 2 and w2.dim() == 2:
        head = BNFreeProjectionHead(w0.shape[1], w0.shape[0], w2.shape[0])
        head_report = compare_state_dict(head, head_state)
        if w0.shape[1] != encoder.feat_dim:
            head_report.mismatched.insert(0, ("projector.0.weight", tuple(w0.shape),
                                              (w0.shape[0], encoder.feat_dim)))
    else:
        head_report.missing = [f"projector.{i}.weight" for i, w in ((0, w0), (2, w2)) if w is None or w.dim() != 2]
        head_report.unexpected = [k for k in head_state if k not in ("0.weight", "2.weight")]
    head_report.missing = [k if k.startswith("projector.") else "projector." + k for k in head_report.missing]
    head_report.unexpected = ["projector." + k for k in head_report.unexpected]
    head_report.mismatched = [(k if k.startswith("projector.") else "projector." + k, a, b)
                              for k, a, b in head_report.mismatched]
    if not head_report.complete:
        if strict:
            raise PretrainedError(f"{where}: projection head does not match Linear-ReLU-Linear (no bias, no BN): "
                                  f"{head_report.problems()}; --no-strict imports the encoder alone")
        head = None
    elif head is not None:
        head.load_state_dict(head_state, strict=True)
    report.missing += head_report.missing
    report.unexpected += head_report.unexpected
    report.mismatched += head_report.mismatched
    report.loaded += ["projector." + k for k in head_report.loaded] if head is not None else []
    return dict(encoder=encoder, head=head, arch=arch, width=width, cifar_stem=stem, normalization=None,
                report=report, uri=path)


def torchvision_hub_file(name: str) -> tuple[str | None, list[str]]:
    """(cached file, candidate URLs) of a torchvision ResNet weights name such as ``resnet50`` (any cached
    ImageNet weights of that model, DEFAULT first) or ``ResNet50_Weights.IMAGENET1K_V1``. Never downloads."""
    import torchvision.models as tvm

    m = re.fullmatch(r"(?i)(?:resnet(18|34|50))(?:_weights)?(?:\.(\w+))?", name.strip())
    if m is None:
        return None, []
    enum = getattr(tvm, f"ResNet{m.group(1)}_Weights")
    tag = (m.group(2) or "DEFAULT").upper()
    if tag == "DEFAULT":
        members = [enum.DEFAULT, *[w for w in enum if w is not enum.DEFAULT]]
    elif tag in enum.__members__:
        members = [enum[tag]]
    else:
        return None, []
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    for w in members:
        path = os.path.join(hub, os.path.basename(w.url))
        if os.path.isfile(path):
            return path, [w.url for w in members]
    return None, [w.url for w in members]


def _load_torchvision(path: str, where: str, strict: bool) -> dict[str, Any]:
    if "://" not in path and not os.path.exists(os.path.expanduser(path)):
        cached, urls = torchvision_hub_file(path)
        if cached is None and urls:
            raise PretrainedError(f"{where}: no such file, and {path} is not in the torch hub cache "
                                  f"({os.path.join(torch.hub.get_dir(), 'checkpoints')}); no download is attempted: "
                                  f"fetch {urls[0]} on a connected machine and pass its path")
        path = cached or path
    state = state_dict_of(read_weights(path, where), where)
    enc_state, dropped = split_fc(state)
    encoder, report, arch, width, stem = import_encoder(enc_state, strict=strict, where=where, dropped=dropped)
    return dict(encoder=encoder, head=None, arch=arch, width=width, cifar_stem=stem,
                normalization=IMAGENET_MEAN_STD, report=report, uri=path)


def _load_simclr_dist(uri: str, where: str, strict: bool) -> dict[str, Any]:
    # imported here: train pulls in the data/Ray-side modules, not needed by the external formats
    from simclr_dist.config import PretrainConfig
    from simclr_dist.data.datasets import dataset_info
    from simclr_dist.run.store.checkpoint import MANIFEST_FILE, latest_checkpoint, load_checkpoint, read_complete
    from simclr_dist.run.store.publish import check_pinned
    from simclr_dist.run.store.weights import build_model

    try:
        if read_complete(uri) is None:
            latest = latest_checkpoint(uri)  # a run directory: its newest complete checkpoint
            if latest is None:
                what = "incomplete checkpoint" if storage.exists(storage.join(uri, MANIFEST_FILE)) else (
                    "no complete checkpoint (checkpoint dir with manifest.json, or a run dir holding one)")
                raise PretrainedError(f"{where}: {what}")
            uri = latest
        check_pinned(uri)  # a published encoder: its SHA-256 must match the pin in SHA256SUMS beside it
        state = load_checkpoint(uri, map_location="cpu")
    except PretrainedError:
        raise
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # checksum mismatch, unreadable pickle, storage
        raise PretrainedError(f"{where}: cannot load checkpoint ({first_line(e)})") from e
    if not isinstance(state, Mapping) or "model" not in state or "config" not in state:
        raise PretrainedError(f"{where}: not a simclr-dist checkpoint (no 'model'/'config' entries)")
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    model_state = state_dict_of(state["model"], where)
    report = compare_state_dict(model, model_state)
    load_verified(model, model_state, report, strict=strict, where=where,
                   what=f"{cfg.arch} width {cfg.width:g}x (the checkpoint's config)")
    info = dataset_info(cfg.dataset)
    return dict(encoder=model.encoder, head=model.head, arch=cfg.arch, width=float(cfg.width),
                cifar_stem=bool(cfg.cifar_stem), normalization=(tuple(info.mean), tuple(info.std)), report=report,
                uri=uri, checkpoint={"epoch": state.get("epoch"), "step": state.get("step"), "config": cfg.to_dict()})


_LOADERS = {"simclr-v1": _load_simclr_v1, "spijkervet": _load_spijkervet, "torchvision": _load_torchvision,
            "simclr-dist": _load_simclr_dist}


def load_pretrained(spec: str, *, strict: bool = True, log: Log | None = None) -> PretrainedEncoder:
    """Import ``FORMAT:PATH_OR_URI`` (see the module docstring), verified; the encoder is returned in eval mode.

    Raises :class:`PretrainedError` with one line for an unreadable file, a layout that is not the format's, or
    (``strict``) any missing/unexpected key or shape mismatch. ``log`` receives the partial-load warning (non-
    strict) and the :meth:`PretrainedEncoder.describe` line.
    """
    fmt, path = parse_weights_spec(spec)
    where = f"--pretrained {fmt}:{path}"
    out = _LOADERS[fmt](path, where, strict)
    encoder = out.pop("encoder").eval()
    head = out.pop("head")
    if head is not None:
        head.eval()
    pre = PretrainedEncoder(encoder=encoder, head=head, feat_dim=encoder.feat_dim, source=f"{fmt}:{path}",
                            format=fmt, **out)
    if log is not None:
        if not pre.report.complete:
            log(f"[pretrained] warning: partial load (--no-strict) of {pre.source}: {pre.report.problems()}; "
                "the rest keeps its random initialisation")
        log(pre.describe())
    return pre


# ---------------------------------------------------------------------------- init of a training run
def init_from_pretrained(model: nn.Module, spec: str, *, strict: bool = True, log: Log | None = None
                         ) -> PretrainedEncoder:
    """Initialise a :class:`~simclr_dist.core.models.SimCLRModel` (``.encoder``, ``.head``) from ``spec`` before the
    first step of a pretraining run (``--pretrained``; a resumed run restores its own checkpoint instead).

    The run's encoder must have the import's architecture (same keys and shapes: choose ``--arch``/``--width``/
    ``--cifar-stem`` to match), else :class:`PretrainedError` in one line. The projection head is copied when the
    file has one of the same layout and shapes (our own checkpoints); otherwise (SimCLR v1: no head; Spijkervet:
    a BN-free head) the run's head keeps its fresh initialisation, which is logged.
    """
    pre = load_pretrained(spec, strict=strict, log=log)
    src = pre.encoder.state_dict()
    report = compare_state_dict(model.encoder, src)
    if not report.complete:
        raise PretrainedError(f"--pretrained {pre.source}: the run's encoder differs from the import "
                              f"({pre.arch} width {pre.width:g}x, {'CIFAR' if pre.cifar_stem else 'ImageNet'} stem): "
                              f"{report.problems()}; pass the matching --arch/--width/--cifar-stem")
    model.encoder.load_state_dict(src, strict=True)
    head_note = "fresh (the import has no projection head)"
    if pre.head is not None and getattr(model, "head", None) is not None:
        head_report = compare_state_dict(model.head, pre.head.state_dict())
        if head_report.complete:
            model.head.load_state_dict(pre.head.state_dict(), strict=True)
            head_note = "copied from the import"
        else:
            head_note = f"fresh (the import's {type(pre.head).__name__} differs: {head_report.problems()})"
    if log is not None:
        log(f"[pretrained] initialised the run's encoder from {pre.source}; projection head {head_note}")
    return pre
