"""SimCLR augmentations as named, switchable components.

Naming each component lets the CLI and ablation grids (paper Fig. 5) toggle them with a
string such as ``"crop,color"`` while the pipeline order stays the paper's:
crop(+resize) -> flip -> colour jitter -> grayscale -> blur -> extras.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .datasets import DatasetInfo

RECIPE: tuple[str, ...] = ("crop", "flip", "color", "gray", "blur")  # the paper's default policy
COLOR_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")  # what "color" jitters (paper: all)
COMPONENTS: tuple[str, ...] = RECIPE + ("cutout", "sobel", "noise", "rotate")  # + Figure-5 ablation extras
# The classifiers' supervised augmentation (pad by size // 8, random crop back to size), combined with "flip" only;
# not a SimCLR component: the classifier loaders build it (run.train.classify_loop, data.classifier_batches)
PADCROP = "padcrop"

ImageLike = Tensor | Image.Image


def parse_components(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"crop,color"`` -> ``("crop", "color")``; ``""``/``"none"`` -> ``()``.

    Returned in canonical (pipeline) order, deduplicated, so equal policies compare equal.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {p.strip().lower() for p in parts} - {"", "none"}
    unknown = sorted(names - set(COMPONENTS))
    if unknown:
        valid = ", ".join(COMPONENTS)
        raise ValueError(f"unknown augmentation component {unknown[0]!r}; choose from {valid} or 'none'")
    return tuple(c for c in COMPONENTS if c in names)


@dataclass(frozen=True)
class AugmentConfig:
    components: tuple[str, ...] = RECIPE
    image_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    color_ops: tuple[str, ...] = COLOR_OPS  # the jitter's ops (grey images: brightness, contrast)
    color_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5  # kernel ~10% of the image side (odd), sigma ~ U[0.1, 2.0]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        # Canonicalise (also accepts "crop,color") so equal policies compare and hash equal.
        object.__setattr__(self, "components", parse_components(self.components))
        ops = {self.color_ops} if isinstance(self.color_ops, str) else set(self.color_ops)
        if ops - set(COLOR_OPS):
            raise ValueError(f"unknown colour op {sorted(ops - set(COLOR_OPS))[0]!r}; choose from {', '.join(COLOR_OPS)}")
        object.__setattr__(self, "color_ops", tuple(o for o in COLOR_OPS if o in ops))
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 <= self.jitter_strength <= 2.5:  # hue 0.2s must stay <= 0.5
            raise ValueError(f"jitter_strength must be in [0, 2.5], got {self.jitter_strength}")
        for name in ("color_p", "gray_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees: exact (no interpolation) on square views."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


class Sobel(torch.nn.Module):
    """Sobel edge magnitude of the luminance, replicated to 3 channels, on float [0, 1] input."""

    def __init__(self) -> None:
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([gx, gx.T])[:, None])  # (2, 1, 3, 3)
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114])[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        gray = (x.reshape(-1, 3, h, w) * self.luma).sum(1, keepdim=True)
        g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), self.kernel)
        mag = g.pow(2).sum(1, keepdim=True).sqrt().div(4.0).clamp(0.0, 1.0)  # a full 0->1 step edge reads 1
        return mag.expand(-1, 3, -1, -1).reshape(x.shape)


def blur_kernel(image_size: int) -> int:
    """Odd kernel ~10% of the side (23 at 224 px as in the paper), at least 3."""
    return max(3, int(0.1 * image_size) | 1)


def jitter_ranges(cfg: AugmentConfig) -> tuple[float, float, float, float]:
    """ColorJitter's (brightness, contrast, saturation, hue) = (0.8s, 0.8s, 0.8s, 0.2s), 0 for ops left out."""
    j = cfg.jitter_strength
    return tuple((0.2 if op == "hue" else 0.8) * j if op in cfg.color_ops else 0.0 for op in COLOR_OPS)  # type: ignore[return-value]


def _resize_ops(image_size: int) -> list[Callable]:
    """Shorter side to image_size, then centre crop: square output without distortion."""
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def build_view_transform(cfg: AugmentConfig) -> Callable[[ImageLike], Tensor]:
    """One random view: uint8 (3, H, W) tensor or PIL -> float32 normalised (3, S, S)."""
    on, s = set(cfg.components), cfg.image_size
    ops: list[Callable] = [v2.ToImage()]
    ops += [v2.RandomResizedCrop(s, scale=cfg.crop_scale, antialias=True)] if "crop" in on else _resize_ops(s)
    if "flip" in on:
        ops.append(v2.RandomHorizontalFlip())
    if "color" in on:
        ops.append(v2.RandomApply([v2.ColorJitter(*jitter_ranges(cfg))], p=cfg.color_p))
    if "gray" in on:
        ops.append(v2.RandomGrayscale(p=cfg.gray_p))
    if "blur" in on:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(s), sigma=(0.1, 2.0))], p=cfg.blur_p))
    if "rotate" in on:
        ops.append(RandomRot90())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if "sobel" in on:
        ops.append(Sobel())
    if "noise" in on:
        ops.append(v2.GaussianNoise(sigma=0.1, clip=True))
    ops.append(v2.Normalize(cfg.mean, cfg.std))
    if "cutout" in on:  # after normalisation, so the erased square holds the dataset mean
        ops.append(v2.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[ImageLike], Tensor]:
    """Deterministic resize + centre crop + normalise, for linear evaluation and feature extraction."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    return v2.Compose([v2.ToImage(), *_resize_ops(image_size), to_float, v2.Normalize(mean, std), v2.ToPureTensor()])


class TwoViewTransform:
    """Two independent draws of the view transform: the positive pair. With ``second`` the second view has its own
    transform (one-branch ablations, paper Figure 5: one branch gets the policy, the other only the crop)."""

    def __init__(self, view_transform: Callable[[ImageLike], Tensor],
                 second: Callable[[ImageLike], Tensor] | None = None):
        self.view_transform = view_transform
        self.second = second if second is not None else view_transform

    def __call__(self, img: ImageLike) -> tuple[Tensor, Tensor]:
        return self.view_transform(img), self.second(img)

    def __repr__(self) -> str:
        if self.second is self.view_transform:
            return f"{type(self).__name__}({self.view_transform!r})"
        return f"{type(self).__name__}({self.view_transform!r}, second={self.second!r})"


class TwoViewDataset(Dataset):
    """Wraps a ``(image, label)`` dataset so items become ``(view1, view2, label)``."""

    def __init__(self, base: Dataset, transform: TwoViewTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        img, label = self.base[i]
        view1, view2 = self.transform(img)
        return view1, view2, int(label)


def default_augment(
    info: DatasetInfo,
    components: str | Sequence[str] | None = None,
    *,
    image_size: int | None = None,
    jitter_strength: float | None = None,
) -> AugmentConfig:
    """The dataset-aware SimCLR default; explicit arguments override it.

    Blur only where ``info.blur`` (paper: ImageNet-size images, not 32 px); colour jitter
    strength 0.5 for CIFAR-size data (paper appendix B.9). Digits drop flip (a mirrored
    digit is another symbol) and use a milder crop (scale >= 0.2) so the digit survives.

    Fashion-MNIST (28 px grey garments, centred on black): crop + flip + brightness/contrast.
    A mirrored shirt or shoe is still a shirt or shoe, so flip stays. On a grey image hue is
    undefined and saturation is zero, so only brightness and contrast jitter change pixels
    (the other two would cost time and do nothing); random grayscale is the identity there.
    No blur: at 28 px a 3-px kernel erases the texture and fine edges (sleeves, straps, the
    shirt/T-shirt/pullover cues) that separate the hardest classes. Crop scale >= 0.2 as for
    digits: an 8%-area crop of 28 px is an 8x8 patch, often pure background, which would make
    positives that share nothing but black.
    """
    digits, fashion = info.name == "digits", info.name == "fashion-mnist"
    if components is None:
        comps = tuple(c for c in RECIPE if not (c == "blur" and not info.blur) and not (c == "flip" and digits)
                      and not (c == "gray" and fashion))
    else:
        comps = parse_components(components)
    return AugmentConfig(
        components=comps,
        image_size=image_size or info.image_size,
        crop_scale=(0.2, 1.0) if digits or fashion else (0.08, 1.0),
        jitter_strength=jitter_strength if jitter_strength is not None else (0.5 if info.image_size <= 32 else 1.0),
        color_ops=("brightness", "contrast") if fashion else COLOR_OPS,
        mean=info.mean,
        std=info.std,
    )


def augment_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's augmentation draws in one epoch: a function of (seed, rank, epoch) only, so an epoch
    replayed after a resume draws the same crops. Every training loop seeds its epochs with it."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63
