"""Reading and verifying weight files: the format-independent half of the importers.

Why apart from :mod:`simclr_dist.run.store.pretrained`: reading a file safely (``torch.load(weights_only=True)``: a
weight file is data and must not run code), unwrapping containers, inferring a ResNet's architecture from its
tensors and reporting in one line how a state dict covers a model are the same for every format.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from simclr_dist import storage
from simclr_dist.config import PretrainConfig, PretrainedError
from simclr_dist.core.models import ResNetEncoder, SimCLRModel, build_backbone

# (block type, blocks per stage) -> architecture; the stem's kernel (7 or 3) and channels give stem and width.
LAYOUTS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


def build_model(cfg: PretrainConfig) -> SimCLRModel:
    """The SimCLR network a (resolved) pretraining config describes; seed the RNG first for identical ranks."""
    return SimCLRModel(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width,
                       proj_hidden_dim=cfg.proj_hidden_dim, proj_out_dim=cfg.proj_out_dim)


# ---------------------------------------------------------------------------- verification
@dataclass
class LoadReport:
    """How a state dict covers a model: what matched, what is missing, unexpected, or of another shape."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model
    dropped: list[str] = field(default_factory=list)  # deliberately ignored (supervised fc head)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """``2 missing keys (first: a), 1 shape mismatch (first: b file [..] vs model [..])``; '' when complete."""
        parts = []
        if self.missing:
            parts.append(f"{_n(len(self.missing), 'missing key')} (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{_n(len(self.unexpected), 'unexpected key')} (first: {self.unexpected[0]})")
        if self.mismatched:
            k, got, want = self.mismatched[0]
            parts.append(f"{_n(len(self.mismatched), 'shape mismatch', 'shape mismatches')} "
                         f"(first: {k} file {list(got)} vs model {list(want)})")
        return ", ".join(parts)


def _n(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def compare_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> LoadReport:
    """Key coverage and shapes of ``state`` against ``model`` (works on meta-device models: shapes only).
    A missing BatchNorm ``num_batches_tracked`` counter is not a problem: it never affects the forward pass
    (momentum is set) and older exports omit it."""
    expected = model.state_dict()
    report = LoadReport()
    for key, want in expected.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
        elif tuple(state[key].shape) != tuple(want.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(want.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in expected]
    return report


def load_verified(model: nn.Module, state: Mapping[str, Tensor], report: LoadReport, *, strict: bool,
                   where: str, what: str) -> None:
    """Load ``state`` into ``model`` after :func:`compare_state_dict`: strict -> complete or
    :class:`PretrainedError`; non-strict -> the matching tensors only (at least one must match)."""
    if not report.complete and (strict or not report.loaded):
        hint = (f"; --no-strict loads the {len(report.loaded)} matching tensors" if strict and report.loaded
                else "; nothing matches")
        raise PretrainedError(f"{where}: does not match {what}: {report.problems()}{hint}")
    if report.complete:
        full = dict(state)
        for key, t in model.state_dict().items():  # fill num_batches_tracked counters the file omits
            full.setdefault(key, torch.zeros_like(t, device="cpu") if t.is_meta else t)
        model.load_state_dict(full, strict=True, assign=True)
    else:
        model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)


# ---------------------------------------------------------------------------- spec and file reading
def first_line(e: BaseException) -> str:
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)", text)
    if m:  # torch's weights_only refusal: keep the reason, not its advice to disable the safety
        reason = m.group(1).strip()
        if reason.startswith("Unsupported operand"):  # not a pickle torch.load understands: corrupt or foreign
            reason = f"corrupt or not written by torch.save ({reason})"
        return f"{type(e).__name__}: {reason}; only tensors and containers are read (weights_only=True)"
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_weights(uri: str, where: str) -> Any:
    """``torch.load(weights_only=True)`` of a local file (memory-mapped when possible) or an object in storage."""
    try:
        if "://" not in uri:
            path = os.path.abspath(os.path.expanduser(uri))
            if not os.path.isfile(path):
                raise PretrainedError(f"{where}: no such file")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (pre-zip) serialisation cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        if not storage.exists(uri):
            raise PretrainedError(f"{where}: no such object")
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except PretrainedError:
        raise
    except storage.StorageError as e:
        raise PretrainedError(f"{where}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # UnpicklingError, EOFError, zip errors, ...: one line, the reason kept
        raise PretrainedError(f"{where}: cannot read as a PyTorch weight file ({first_line(e)})") from e


def state_dict_of(obj: Any, where: str, containers: tuple[str, ...] = ("state_dict",)) -> dict[str, Tensor]:
    """The tensor dict of a loaded file (unwrapping ``{'state_dict': ...}``-style containers and DataParallel /
    DDP / torch.compile key prefixes)."""
    for key in containers:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else "an empty or non-string-keyed dict"
        raise PretrainedError(f"{where}: not a state dict (got {kind})")
    state = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise PretrainedError(f"{where}: not a state dict ({k!r} holds a {type(v).__name__}, not a tensor)")
        for p in WRAPPER_PREFIXES:
            k = k.removeprefix(p)
        state[k] = v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
    return state


# ---------------------------------------------------------------------------- ResNet encoders
def infer_resnet(state: Mapping[str, Tensor], where: str) -> tuple[str, float, bool]:
    """(arch, width, cifar_stem) of a torchvision-layout ResNet state dict, from its tensors alone."""
    w = state.get("conv1.weight")
    if w is None or w.dim() != 4 or w.shape[1] != 3:
        first = ", ".join(list(state)[:3])
        raise PretrainedError(f"{where}: not a ResNet encoder (no 3-channel 'conv1.weight'; keys start {first})")
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    blocks = []
    for stage in range(1, 5):
        idx = [int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))]
        blocks.append(max(idx) + 1 if idx else 0)
    arch = LAYOUTS.get((kind, tuple(blocks)))
    if arch is None:
        raise PretrainedError(f"{where}: unsupported ResNet layout ({kind} blocks per stage {blocks}); supported: "
                              + ", ".join(f"{a} {list(b)}" for (_, b), a in LAYOUTS.items()))
    width = w.shape[0] / 64
    if not 0 < width <= 8:
        raise PretrainedError(f"{where}: conv1 has {w.shape[0]} channels (width {width:g}x); supported up to 8x")
    return arch, width, w.shape[-1] == 3


def import_encoder(state: Mapping[str, Tensor], *, strict: bool, where: str,
                   dropped: list[str] | None = None) -> tuple[ResNetEncoder, LoadReport, str, float, bool]:
    """Build the encoder the tensors describe and load them, verified.

    A complete load builds the encoder on the meta device and adopts the file's tensors (no random init, no
    second copy: a 375M-parameter R50-4x costs its own size once); a partial (non-strict) load builds it
    normally so the missing part keeps torchvision's initialisation.
    """
    arch, width, cifar_stem = infer_resnet(state, where)
    with torch.device("meta"):
        meta, _ = build_backbone(arch, cifar_stem=cifar_stem, width=width)
    report = compare_state_dict(meta, state)
    report.dropped = list(dropped or [])
    what = f"{arch} width {width:g}x"
    encoder = meta if report.complete else build_backbone(arch, cifar_stem=cifar_stem, width=width)[0]
    load_verified(encoder, state, report, strict=strict, where=where, what=what)
    return encoder, report, arch, width, cifar_stem


def split_fc(state: Mapping[str, Tensor], prefix: str = "") -> tuple[dict[str, Tensor], list[str]]:
    """(encoder tensors without ``prefix``, dropped ``fc.*`` keys)."""
    enc, dropped = {}, []
    for k, v in state.items():
        if k.startswith(prefix + "fc."):
            dropped.append(k)
        elif k.startswith(prefix):
            enc[k[len(prefix):]] = v
    return enc, dropped

