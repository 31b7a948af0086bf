"""An encoder in formats other programs run: a torchvision state dict (safetensors or torch), ONNX and TorchScript,
each checked against the PyTorch encoder on real images before a byte is written.

Why a parity check inside the export rather than only in the tests: an exporter can trace a graph that runs and
computes something else (a BatchNorm left in training mode, a batch axis frozen at the traced size, a layer the
converter folds wrongly). So every export re-reads what it produced with the consumer's own runtime (torchvision's
``ResNet`` with ``strict=True``, onnxruntime, ``torch.jit.load``), feeds it ``n`` real test images of the encoder's
dataset (the embedded digits when that dataset's files are not here) through the project's evaluation transform,
and compares the features with the encoder's in eval mode. A max abs difference above the tolerance refuses the
export in one line and writes nothing.

Where the input contract lives: the model takes ``(N, 3, S, S)`` float32 images already normalised,
``(pixels / 255 - mean) / std``; ``S``, ``mean`` and ``std`` are written into the file itself (ONNX
``metadata_props``, TorchScript extra file ``simclr_dist.json``, safetensors header metadata) and, for every format,
into a sidecar ``OUT.json`` beside it, with the SHA-256 of the exported file and the parity measured.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from simclr_dist import storage
from simclr_dist.config import PretrainConfig
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import DatasetError, load_dataset
from simclr_dist.data.splits import labelled_splits
from simclr_dist.run.store.pretrained import load_pretrained
from simclr_dist.run.store.publish import PublishError, resolve_checkpoint, torchvision_arch

# Opset 17: every operator of a ResNet (Conv, BatchNormalization folded into Conv, Relu, MaxPool, Add,
# GlobalAveragePool, Flatten) is stable since opset 13 or earlier, and 17 is the newest opset that onnxruntime >= 1.14,
# TensorRT 8.6 and OpenVINO 2023 all run, so the file loads in the runtimes a user is likely to have. The legacy
# (TorchScript-based) exporter is used because the dynamo exporter needs onnxscript, which is not a dependency.
ONNX_OPSET = 17
PARITY_IMAGES = 64
# Tolerance of the parity check: max |features - reference| <= PARITY_RTOL * max(1, max |reference|). float32
# round-off of a ResNet's reordered sums is ~1e-6 of the feature scale; 1e-4 leaves room for other kernels
# (onnxruntime's, MKL-DNN's) and still catches any real difference (a wrong BN mode is off by O(1)).
PARITY_RTOL = 1e-4
METADATA_FILE = "simclr_dist.json"  # TorchScript: the extra file holding the input contract
WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


@dataclass(frozen=True)
class EncoderFacts:
    """What a user of an exported encoder needs besides its weights: the input contract and where it came from."""

    arch: str
    width: float
    cifar_stem: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feat_dim: int
    dataset: str
    checkpoint: str
    epoch: int | None
    data_root: str | None = None  # where the run read its dataset (for the parity images; not exported)

    def input_contract(self) -> dict[str, Any]:
        return {"shape": ["N", 3, self.image_size, self.image_size], "dtype": "float32", "layout": "NCHW",
                "normalisation": "(pixels / 255 - mean) / std, RGB", "mean": list(self.mean), "std": list(self.std),
                "image_size": self.image_size}

    def metadata(self) -> dict[str, str]:
        """Flat string pairs for the formats whose metadata is string -> string (ONNX, safetensors)."""
        return {"simclr_dist.arch": self.arch, "simclr_dist.width": f"{self.width:g}",
                "simclr_dist.cifar_stem": str(self.cifar_stem).lower(),
                "simclr_dist.image_size": str(self.image_size), "simclr_dist.mean": json.dumps(list(self.mean)),
                "simclr_dist.std": json.dumps(list(self.std)), "simclr_dist.feat_dim": str(self.feat_dim),
                "simclr_dist.dataset": self.dataset, "simclr_dist.checkpoint": self.checkpoint,
                "simclr_dist.input": "float32 NCHW (N, 3, image_size, image_size), (pixels / 255 - mean) / std"}


@dataclass(frozen=True)
class Parity:
    """How an exported model's features compare with the PyTorch encoder's on real images."""

    images: int
    source: str  # e.g. "digits/test (the encoder's dataset)"
    max_abs_diff: float
    tolerance: float
    feature_scale: float  # max |reference feature|

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def text(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e}) over {self.images} "
                f"{self.source} images")


@dataclass(frozen=True)
class Exported:
    """What was written: the file, its sidecar, its SHA-256, the facts and the parity that allowed it."""

    out: str
    sidecar: str
    format: str
    sha256: str
    facts: EncoderFacts
    parity: Parity
    detail: str  # one phrase on the format, e.g. "onnx opset 17, dynamic batch axis"


# ---------------------------------------------------------------------------- inputs
def load_encoder(source: str) -> tuple[nn.Module, EncoderFacts]:
    """The encoder of a run's newest complete checkpoint (or of a checkpoint directory), in eval mode, and its facts;
    loaded through the importer, so a published encoder's SHA-256 pin is checked."""
    ckpt = resolve_checkpoint(source)
    pre = load_pretrained(f"simclr-dist:{ckpt}")
    cfg = PretrainConfig.from_dict(pre.checkpoint["config"])  # type: ignore[index]
    mean, std = pre.mean_std()
    facts = EncoderFacts(arch=pre.arch, width=pre.width, cifar_stem=pre.cifar_stem, image_size=int(cfg.image_size),
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                         feat_dim=pre.feat_dim, dataset=cfg.dataset, checkpoint=pre.uri, epoch=pre.epoch,
                         data_root=cfg.data_root)
    return pre.encoder.float().eval(), facts


def parity_images(facts: EncoderFacts, n: int = PARITY_IMAGES, data_root: str | None = None) -> tuple[Tensor, str]:
    """(``n`` real test images through the evaluation transform, ``(n, 3, S, S)`` float32, and where they come from).

    The encoder's own dataset's held-out split when it can be read here (embedded, or under ``data_root``, by
    default the run's own); else the embedded digits at the encoder's size (real images, another domain: parity is
    about the arithmetic, not the accuracy). Spread evenly over the split, so several classes are seen."""
    if n < 1:
        raise PublishError(f"--parity-images: must be >= 1, got {n}")
    name, note = facts.dataset, "the encoder's dataset"
    try:
        split = labelled_splits(name)[1]
        data = load_dataset(name, split, root=data_root or facts.data_root, image_size=facts.image_size)
    except (DatasetError, OSError, RuntimeError):
        name, split, note = "digits", "test", f"embedded; {facts.dataset} is not readable here, see --data-root"
        data = load_dataset(name, split, image_size=facts.image_size)
    size = len(data)  # type: ignore[arg-type]
    picks = torch.linspace(0, size - 1, min(n, size)).round().long().tolist()
    transform = build_eval_transform(facts.image_size, facts.mean, facts.std)
    images = torch.stack([transform(data[i][0]) for i in picks]).float()  # (n, 3, S, S)
    return images, f"{name}/{split} ({note})"


@torch.no_grad()
def compare(reference: Tensor, candidate: Tensor, images: int, source: str) -> Parity:
    """Parity of two (N, D) feature matrices: max abs difference against a tolerance on the reference's scale."""
    if tuple(candidate.shape) != tuple(reference.shape):
        raise PublishError(f"the exported model gives features of shape {list(candidate.shape)}, the encoder "
                           f"{list(reference.shape)}; nothing written")
    scale = float(reference.abs().max())
    diff = float((candidate.float() - reference.float()).abs().max())
    return Parity(images, source, diff, PARITY_RTOL * max(1.0, scale), scale)


# ---------------------------------------------------------------------------- formats
def check_out(out: str, fmt: str) -> None:
    """One line for an ``--out`` whose extension does not say the format, or that (or whose sidecar) exists."""
    ext = os.path.splitext(out)[1].lower()
    allowed = {"torchvision": tuple(WEIGHT_SUFFIXES), "onnx": (".onnx",), "torchscript": TORCHSCRIPT_SUFFIXES}[fmt]
    if ext not in allowed:
        raise PublishError(f"--out {out}: a {fmt} export must end with {' or '.join(allowed)}"
                           + (" (.safetensors: safetensors weights, .pt/.pth: torch.save)" if fmt == "torchvision"
                              else ""))
    for path in (out, sidecar_of(out)):
        if storage.exists(path):
            raise PublishError(f"{path}: exists; nothing is overwritten")


def sidecar_of(out: str) -> str:
    return out + ".json"


@torch.no_grad()
def reference_features(encoder: nn.Module, images: Tensor) -> Tensor:
    return encoder(images).float()  # (N, D)


def torchvision_bytes(facts: EncoderFacts, encoder: nn.Module, images: Tensor, where: str,
                      weights: str) -> tuple[bytes, Parity, str]:
    """The encoder's state dict under torchvision's names (our ResNet keeps them), as safetensors (with the input
    contract in its header) or torch.save bytes; checked by loading it into ``torchvision.models.<arch>()`` with
    ``strict=True`` and comparing its features."""
    import torchvision

    arch = torchvision_arch(facts.arch, facts.width, facts.cifar_stem, facts.checkpoint)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import load as st_load, save as st_save

        data = st_save(state, metadata=facts.metadata())
        reloaded = st_load(data)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        reloaded = torch.load(io.BytesIO(data), weights_only=True)
    tv = getattr(torchvision.models, arch)()
    tv.fc = nn.Identity()  # the encoder has no classifier: features out
    tv.load_state_dict(reloaded, strict=True)
    with torch.no_grad():
        got = tv.eval()(images)  # (N, D)
    parity = compare(reference_features(encoder, images), got, len(images), where)
    return data, parity, f"torchvision.models.{arch}() with fc = Identity, strict=True, {weights} weights"


def onnx_bytes(facts: EncoderFacts, encoder: nn.Module, images: Tensor, where: str) -> tuple[bytes, Parity, str]:
    """``torch.onnx.export`` of the encoder, ``images`` (N, 3, S, S) -> ``features`` (N, D) with a dynamic batch
    axis, the input contract in ``metadata_props``; checked by ``onnx.checker`` and run by onnxruntime on the real
    images (all at once, and one alone: the batch axis must really be free)."""
    import onnx
    import onnxruntime as ort

    model = copy.deepcopy(encoder).float().eval()
    try:
        with tempfile.TemporaryDirectory(prefix="simclr-onnx-") as tmp:
            path = os.path.join(tmp, "encoder.onnx")
            with warnings.catch_warnings():  # the legacy exporter's deprecation notice: chosen, see ONNX_OPSET
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (images[:2],), path, dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["images"], output_names=["features"], do_constant_folding=True,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
            proto = onnx.load(path)
        for key, value in facts.metadata().items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = (f"SimCLR {facts.arch} width {facts.width:g} encoder from {facts.checkpoint}: images "
                            f"(N, 3, {facts.image_size}, {facts.image_size}) float32, (pixels/255 - mean)/std -> "
                            f"features (N, {facts.feat_dim})")
        onnx.checker.check_model(proto, full_check=True)
        data = proto.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["features"], {"images": images.numpy()})[0])  # (N, D)
        one = torch.from_numpy(session.run(["features"], {"images": images[:1].numpy()})[0])  # (1, D)
    except Exception as e:  # exporter, checker or runtime: one line, nothing written
        raise PublishError(f"onnx export of {facts.checkpoint} failed: {type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]}; nothing written") from e
    reference = reference_features(encoder, images)
    parity = compare(torch.cat([reference, reference[:1]]), torch.cat([got, one]), len(images), where)
    return data, parity, f"onnx opset {ONNX_OPSET}, dynamic batch axis, checked with onnxruntime {ort.__version__}"


def torchscript_bytes(facts: EncoderFacts, encoder: nn.Module, images: Tensor, where: str,
                      sidecar: dict[str, Any]) -> tuple[bytes, Parity, str]:
    """``torch.jit.trace`` of the encoder (a ResNet has no data-dependent control flow, so the trace is the
    network), saved with the input contract as the extra file ``simclr_dist.json``, reloaded with ``torch.jit.load``
    and run on the real images, all at once and one alone."""
    model = copy.deepcopy(encoder).float().eval()
    with warnings.catch_warnings():  # torch.jit's deprecation notices: TorchScript is the format asked for
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, images[:2])
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={METADATA_FILE: json.dumps(sidecar, indent=1)})
        data = buf.getvalue()
        extra = {METADATA_FILE: ""}
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    if json.loads(extra[METADATA_FILE]).get("input") != sidecar["input"]:
        raise PublishError(f"TorchScript: the extra file {METADATA_FILE} did not survive a reload; nothing written")
    with torch.no_grad():
        got = torch.cat([reloaded(images), reloaded(images[:1])]).float()  # (N + 1, D)
    reference = reference_features(encoder, images)
    parity = compare(torch.cat([reference, reference[:1]]), got, len(images), where)
    return data, parity, f"TorchScript (torch.jit.trace), input contract in its extra file {METADATA_FILE}"


def export_encoder(source: str, fmt: str, out: str, *, parity_n: int = PARITY_IMAGES, data_root: str | None = None,
                   log: Callable[[str], None] | None = None) -> Exported:
    """Export ``source``'s encoder as ``fmt`` (torchvision, onnx, torchscript) to ``out`` (local or URI), with the
    sidecar ``out.json``; refuses in one line (:class:`PublishError`) a network the format cannot hold, an existing
    ``out``, or an export whose features differ from the encoder's beyond the tolerance (nothing is written)."""
    check_out(out, fmt)
    encoder, facts = load_encoder(source)
    if fmt == "torchvision":  # a network torchvision cannot hold is refused before any other work
        torchvision_arch(facts.arch, facts.width, facts.cifar_stem, source)
    images, where = parity_images(facts, parity_n, data_root)  # (n, 3, S, S)
    if log is not None:
        log(f"[export] {facts.arch} width {facts.width:g}x from {facts.checkpoint}; parity on {len(images)} "
            f"{where} images")
    sidecar: dict[str, Any] = {
        "format": fmt, "file": os.path.basename(out), "model": {k: v for k, v in asdict(facts).items()
                                                                 if k not in ("mean", "std", "image_size",
                                                                              "data_root")},
        "input": facts.input_contract(), "output": {"name": "features", "shape": ["N", facts.feat_dim]},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    if fmt == "torchvision":
        weights = WEIGHT_SUFFIXES[os.path.splitext(out)[1].lower()]
        data, parity, detail = torchvision_bytes(facts, encoder, images, where, weights)
    elif fmt == "onnx":
        data, parity, detail = onnx_bytes(facts, encoder, images, where)
        sidecar["onnx_opset"] = ONNX_OPSET
    elif fmt == "torchscript":
        data, parity, detail = torchscript_bytes(facts, encoder, images, where, sidecar)
    else:
        raise PublishError(f"--format {fmt}: not an interchange format (torchvision, onnx, torchscript)")
    if not parity.ok:
        raise PublishError(f"{fmt} export of {facts.checkpoint} fails parity: {parity.text()}; nothing written")
    digest = hashlib.sha256(data).hexdigest()
    sidecar.update(sha256=digest, parity=asdict(parity), detail=detail)
    storage.write_bytes(out, data)
    storage.write_bytes(sidecar_of(out), (json.dumps(sidecar, indent=1) + "\n").encode())
    return Exported(out, sidecar_of(out), fmt, digest, facts, parity, detail)
