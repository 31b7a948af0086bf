"""SimCLR networks: a width-scalable ResNet encoder f(.) and the MLP projection head g(.).

The encoder keeps torchvision's module names (conv1, bn1, layer1..layer4) so that published
torchvision and converted SimCLR checkpoints load with a plain `load_state_dict`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")

_SPECS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(nn.Module):
    """torchvision ResNet without `fc`, with every stage (stem included) widened by `width`.

    torchvision's own `ResNet` hard-codes 64 stem channels and its wide variants only widen the
    bottleneck interior, whereas SimCLR's R50-2x/4x scale all channels; hence this small rebuild
    that reuses torchvision's blocks and initialisation.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        cifar_stem: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(1, round(c * width))

        self.inplanes = ch(64)
        if cifar_stem:  # 32x32 inputs: a 7x7/2 conv + max-pool would throw away most of the image
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, ch(64), layers[0])
        self.layer2 = self._make_layer(block, ch(128), layers[1], stride=2)
        self.layer3 = self._make_layer(block, ch(256), layers[2], stride=2)
        self.layer4 = self._make_layer(block, ch(512), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feat_dim: int = ch(512) * block.expansion

        for m in self.modules():  # same init as torchvision.models.resnet.ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(arch: str, *, cifar_stem: bool = False, width: float = 1.0) -> tuple[nn.Module, int]:
    """Return (encoder, feat_dim); the encoder maps (N, 3, H, W) -> (N, feat_dim)."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or not 0 < width <= 8
    ):
        raise ValueError(f"width must be a number in (0, 8], got {width!r}")
    block, layers = _SPECS[arch]
    encoder = ResNetEncoder(block, layers, cifar_stem=cifar_stem, width=float(width))
    return encoder, encoder.feat_dim


class ProjectionHead(nn.Sequential):
    """g(h) = W2 ReLU(BN(W1 h)). The contrastive loss is applied to g(h) so that h keeps the
    information the loss would otherwise discard (SimCLR sec. 4.2); W1 has no bias because BN follows."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)


class SimCLRModel(nn.Module):
    """Encoder + projection head; forward returns both so one pass serves loss and monitoring."""

    def __init__(
        self,
        arch: str = "resnet18",
        *,
        cifar_stem: bool = False,
        width: float = 1.0,
        proj_hidden_dim: int | None = None,
        proj_out_dim: int = 128,
    ) -> None:
        super().__init__()
        self.encoder, self.feat_dim = build_backbone(arch, cifar_stem=cifar_stem, width=width)
        self.head = ProjectionHead(self.feat_dim, proj_hidden_dim or self.feat_dim, proj_out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # representation used for linear evaluation
        return h, self.head(h)  # z: what the NT-Xent loss sees


class Classifier(nn.Module):
    """Encoder + a new linear head (zero-initialised, so training starts from uniform predictions)."""

    def __init__(self, encoder: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.encoder, self.fc = encoder, nn.Linear(feat_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 * multiply-accumulates) of one single-sample forward pass.

    Runs on meta tensors via `functional_call`, so it costs no compute or memory wherever the model
    lives and leaves its weights and BN statistics untouched. Eval mode is used because train-mode
    BatchNorm1d rejects a batch of one; BN contributes no matmul FLOPs either way. Pass the plain
    module, not a DDP/compiled wrapper.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {n: torch.empty_like(t, device="meta") for n, t in tensors.items()}
    x = torch.empty(1, *input_shape, device="meta")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (x,))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(counter.get_total_flops())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Replace every BatchNorm layer's running statistics by the mean and variance of ``batches`` (an
    iterable of input tensors ``(B, C, H, W)``) as the layer sees them; returns the images seen. Weights and the
    BN affine parameters are untouched; the model's mode is restored.

    Why: a randomly initialised encoder evaluated in eval mode normalises with the statistics of initialisation
    (mean 0, variance 1), not those of real images, so a random-init baseline could be said to be handicapped by
    them; the studies probe it both ways. Measured, recalibration makes that baseline worse, not better, on
    Fashion-MNIST at every fraction (docs/experiments.md, the protocol's baselines). ``momentum=None`` makes the running
    statistics a cumulative average (of the per-batch means and variances)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x in batches:  # x: (B, C, H, W)
            model(x)
            seen += len(x)
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    if norms and seen == 0:
        raise ValueError("recalibrate_batchnorm: no images given")
    return seen
