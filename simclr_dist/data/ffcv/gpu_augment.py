"""The SimCLR view recipe after the crop, as batched tensor ops on the training device (GPU when present).

Why batched tensors instead of FFCV's numba ops: FFCV ships flip and brightness/contrast/saturation only,
each with its own probability and a fixed order, drawing from numba's per-thread RNG (not reproducible across
a resume). Here every op of :func:`simclr_dist.data.augment.build_view_transform` is reproduced per sample
with the same parameters and order - colour jitter applied as a whole with p=0.8 in a random per-sample order
of brightness/contrast/saturation/hue, grayscale, Gaussian blur with a per-sample sigma, and the Figure-5
extras - and every draw comes from one ``torch.Generator`` the loader reseeds from (seed, rank, epoch).
The measurements behind the choice are in docs/ffcv.md and ``bench/loader.py --what aug``.

Input: uint8 ``(B, H, W, 3)`` (FFCV's layout) or ``(B, 3, H, W)`` square crops already resized to the view
size. Output: float32 normalised ``(B, 3, S, S)``, contiguous. Two loaders use it: the FFCV loader (crops from
its compiled decode) and :mod:`simclr_dist.data.resident` (crops gathered from images held as one tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simclr_dist.data.augment import AugmentConfig, Sobel, blur_kernel, jitter_ranges

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f).clamp_(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Shift hue by ``f`` (in turns, per sample): RGB -> HSV -> RGB as in torchvision's tensor kernel."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc, cr = maxc == minc, maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + f.view(-1, 1, 1), 1.0)
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (maxc * (1.0 - s)).clamp_(0, 1)
    q = (maxc * (1.0 - s * fr)).clamp_(0, 1)
    t = (maxc * (1.0 - s * (1.0 - fr))).clamp_(0, 1)
    # Sector i picks (r, g, b) from (v, q, p, t): gather over a stacked (B, 4, H, W) tensor.
    vqpt = torch.stack((maxc, q, p, t), 1)
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device)
    idx = table[i].permute(0, 3, 1, 2)  # (B, 3, H, W)
    return vqpt.gather(1, idx)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _reflect_blur_matrix(weights: Tensor, size: int) -> Tensor:
    """(B, size, size) matrices M with ``M @ v`` = the 1-D convolution of v with each row of ``weights`` (odd
    length k) under reflect padding: a batched matmul instead of a grouped convolution with B*3 groups,
    which is many times slower on CPU."""
    b, k = weights.shape
    r = k // 2
    out = torch.arange(size, device=weights.device)
    m = torch.zeros(b, size, size, dtype=weights.dtype, device=weights.device)
    for t in range(k):
        src = (out + t - r).abs()
        src = torch.where(src >= size, 2 * (size - 1) - src, src)
        m[:, out, src] += weights[:, t:t + 1]
    return m


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding (torchvision's GaussianBlur)."""
    h, w = x.shape[-2:]
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k1 = k1 / k1.sum(1, keepdim=True)
    rows = _reflect_blur_matrix(k1, h)[:, None]
    cols = rows if w == h else _reflect_blur_matrix(k1, w)[:, None]
    return rows @ x @ cols.transpose(-1, -2)


class BatchedViewAugment:
    """One random view per sample of a batch: everything in ``cfg.components`` but the crop (the decoder's job)."""

    def __init__(self, cfg: AugmentConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.on = set(cfg.components)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        # (low, high) of each jitter factor, as torchvision's ColorJitter(*jitter_ranges(cfg)); ops at 0 are off
        b, c, sat, hue = jitter_ranges(cfg)
        self.jitter = [(max(0.0, 1 - r), 1 + r) for r in (b, c, sat)] + [(-hue, hue)]
        self.jitter_on = [r > 0 for r in (b, c, sat, hue)]
        self.sobel = Sobel().to(self.device) if "sobel" in self.on else None
        self.sync_free = self.device.type == "cuda"  # see _masked

    def __repr__(self) -> str:
        return f"{type(self).__name__}({','.join(self.cfg.components)}, device={self.device})"

    def _rand(self, g: torch.Generator, part: tuple[int, int], n: int, *shape: int) -> Tensor:
        """``n`` samples' uniform draws: this part's rows ``rank::world`` of a draw for ``n * world`` samples."""
        rank, world = part
        return torch.rand((n * world, *shape), generator=g, device=self.device)[rank::world]

    def _masked(self, x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *params: Tensor) -> Tensor:
        """``fn(x, *params)`` on the samples where ``mask`` holds (``params``: per-sample values, sliced alike).

        Why two ways: on a CPU only the chosen samples are computed (compute is the cost); on a GPU every sample is
        computed and blended with ``torch.where``, because indexing by a data-dependent mask (``nonzero``) blocks
        the host until the device catches up, which would stall the queueing of the training step and show the
        previous step's GPU time as data wait. Both give the same values for the same generator."""
        if self.sync_free:
            return torch.where(mask.view(-1, 1, 1, 1), fn(x, *params), x)
        idx = mask.nonzero().flatten()
        if idx.numel():
            x[idx] = fn(x[idx], *(p[idx] for p in params))
        return x

    def __call__(self, images: Tensor, g: torch.Generator, part: tuple[int, int] = (0, 1)) -> Tensor:
        """Views of ``images`` (uint8, ``(B, 3, S, S)`` or ``(B, S, S, 3)``) drawn from ``g``.

        ``part=(rank, world)``: the batch is rows ``rank::world`` of a batch of ``B * world`` samples, and every
        draw is made for that whole batch and sliced, so sample k of the big batch gets the same parameters
        whichever part holds it (the resident loader's promise: W ranks x B views equal one rank x W*B views).
        The default ``(0, 1)`` draws for this batch alone."""
        cfg, on = self.cfg, self.on
        if images.shape[-1] == 3 and images.shape[1] != 3:  # FFCV's (B, H, W, 3)
            images = images.permute(0, 3, 1, 2)
        x = images.to(self.device, non_blocking=True).to(torch.float32).div_(255).contiguous()
        n, s = x.shape[0], x.shape[-1]

        def rand(*shape: int) -> Tensor:  # (n, *shape) uniform draws of this part
            return self._rand(g, part, n, *shape)

        if "flip" in on:
            x = self._masked(x, rand() < 0.5, lambda t: t.flip(-1))
        if "color" in on:
            apply = rand() < cfg.color_p
            factors = torch.stack([lo + (hi - lo) * rand() for lo, hi in self.jitter], 1)
            order = rand(4).argsort(1)  # torchvision: a fresh randperm(4) per image
            for pos in range(4):
                for op in range(4):
                    if self.jitter_on[op]:
                        x = self._masked(x, apply & (order[:, pos] == op),
                                         lambda t, f, op=op: _JITTER[op](t, f if op == 3 else f.view(-1, 1, 1, 1)),
                                         factors[:, op])
        if "gray" in on:
            x = self._masked(x, rand() < cfg.gray_p, lambda t: _gray(t).expand(-1, 3, -1, -1))
        if "blur" in on:
            apply, sigma = rand() < cfg.blur_p, 0.1 + 1.9 * rand()
            x = self._masked(x, apply, lambda t, sd: gaussian_blur(t, sd, blur_kernel(s)), sigma)
        if "rotate" in on:
            k = (rand() * 4).long().clamp_(max=3)
            for r in (1, 2, 3):
                x = self._masked(x, k == r, lambda t, r=r: torch.rot90(t, r, dims=(-2, -1)))
        if self.sobel is not None:
            x = self.sobel(x)
        if "noise" in on:  # drawn for the whole batch of n * world samples like every other draw
            rank, world = part
            noise = torch.randn((n * world, *x.shape[1:]), generator=g, device=self.device)[rank::world]
            x = (x + 0.1 * noise).clamp_(0, 1)
        x = (x - self.mean) / self.std  # out of place: sobel's output is an expanded view
        if "cutout" in on:  # after normalisation: the erased square holds the dataset mean (0)
            x = x.masked_fill_(self._cutout_mask(rand, n, x.shape[-2], x.shape[-1]), 0.0)
        return x

    def _cutout_mask(self, rand: Callable[..., Tensor], n: int, h: int, w: int) -> Tensor:
        """Square of area U(0.02, 0.25) of the image at a uniform position (RandomErasing, ratio 1, p=1)."""
        side = (rand() * 0.23 + 0.02).mul_(h * w).sqrt_().round_().long()
        side = torch.minimum(side, torch.tensor(min(h, w) - 1, device=self.device)).clamp_(min=0)
        top = (rand() * (h - side + 1)).long()
        left = (rand() * (w - side + 1)).long()
        rows = torch.arange(h, device=self.device).view(1, h, 1)
        cols = torch.arange(w, device=self.device).view(1, 1, w)
        t, l_, sd = top.view(-1, 1, 1), left.view(-1, 1, 1), side.view(-1, 1, 1)
        return (((rows >= t) & (rows < t + sd)) & ((cols >= l_) & (cols < l_ + sd))).unsqueeze(1)

