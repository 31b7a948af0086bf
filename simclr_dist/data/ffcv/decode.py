"""The CPU side of the FFCV path: one JPEG decode per image, two seeded crops resized to the view size.

Why one decoder for both views: FFCV runs one decoder per pipeline, so two pipelines on the ``image`` field (the
obvious way to get two views) decode every image twice; decoding dominates the CPU cost at 224 px. This decoder
writes both views of a sample into one ``(2, S, S, 3)`` slot after a single decode.

Why a reduced-scale decode: libjpeg-turbo can run its inverse DCT at 1/2, 1/4 or 1/8 scale, which skips most of
the IDCT and colour-conversion work. It is used only when *both* crop boxes still hold at least ``S`` pixels on
each side at that scale (so no view is upsampled from a coarser decode than it needs); the crop boxes are drawn in
full-resolution coordinates first, so the draws, and thus the seeded replay, do not depend on the scale.

Crop boxes are torchvision's ``RandomResizedCrop.get_params`` algorithm driven by a counter-based hash of
(epoch seed, sample id, view) instead of a stateful RNG, so they do not depend on which numba thread decodes which
sample. Figures: docs/performance.md, "CPU side of the two-view pipeline".
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

CROP_RATIO = (3 / 4, 4 / 3)
DECODE_SCALES = (8, 4, 2)  # 1/d IDCT scalings that are cheaper than a full decode (7/8..5/8 measured slower)


class EpochSeed:
    """A 64-bit seed that compiled decoders read at run time (through its address), so ``set_epoch`` takes effect
    without recompiling (numba freezes closure arrays as constants)."""

    def __init__(self) -> None:
        self.cell = np.zeros(1, np.uint64)
        self.address = int(self.cell.ctypes.data)

    def set(self, value: int) -> None:
        self.cell[0] = np.uint64(value & 0xFFFFFFFFFFFFFFFF)


def mix64(*xs: int) -> int:
    """splitmix64 over the arguments: well-spread 64-bit seeds from (seed, rank, epoch, ...)."""
    z = 0x9E3779B97F4A7C15
    for x in xs:
        z = (z ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z


def load_u64_intrinsic() -> Any:
    """A numba intrinsic: read the uint64 stored at an address (the live :class:`EpochSeed`)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def load_u64(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))))
        return types.uint64(address), codegen

    return load_u64


def make_crop_fn(scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO) -> Any:
    """``crop(epoch_seed, sample, view, height, width) -> (top, left, h, w)``: torchvision's
    RandomResizedCrop.get_params (10 tries, then the centre crop), drawing from splitmix64. Plain Python that numba
    compiles; callable from Python too (the tests recompute the boxes with it)."""
    import numba

    s0, s1 = float(scale[0]), float(scale[1])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    golden, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    r30, r27, r31, r11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

    def mix(z):
        z = (z ^ (z >> r30)) * m1
        z = (z ^ (z >> r27)) * m2
        return z ^ (z >> r31)

    mix = numba.njit(mix, nogil=True)

    def crop(epoch_seed, sample, view, height, width):
        state = mix(epoch_seed ^ mix(sample * golden + view))
        area = np.float64(height) * np.float64(width)
        for _ in range(10):
            state = state + golden
            u1 = np.float64(mix(state) >> r11) * 2.0 ** -53
            state = state + golden
            u2 = np.float64(mix(state) >> r11) * 2.0 ** -53
            target_area = area * (s0 + (s1 - s0) * u1)
            aspect = np.exp(lr0 + (lr1 - lr0) * u2)
            w = int(round(np.sqrt(target_area * aspect)))
            h = int(round(np.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                state = state + golden
                u3 = np.float64(mix(state) >> r11) * 2.0 ** -53
                state = state + golden
                u4 = np.float64(mix(state) >> r11) * 2.0 ** -53
                return int(u3 * (height - h + 1)), int(u4 * (width - w + 1)), h, w
        in_ratio = np.float64(width) / np.float64(height)
        if in_ratio < ratio[0]:
            w = int(width)
            h = int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            h = int(height)
            w = int(round(h * ratio[1]))
        else:
            w, h = int(width), int(height)
        return (int(height) - h) // 2, (int(width) - w) // 2, h, w

    return crop


def center_crop(epoch_seed, sample, view, height, width):
    """The torch path's Resize(shorter side) + CenterCrop as a box: the centred square of the shorter side."""
    side = min(int(height), int(width))
    return (int(height) - side) // 2, (int(width) - side) // 2, side, side


def decode_scale(size: int, h0: int, w0: int, h1: int, w1: int, enabled: bool) -> int:
    """The coarsest IDCT scale 1/d at which both crop boxes still hold >= ``size`` pixels a side (1: full decode)."""
    if enabled:
        side = min(h0, w0, h1, w1)
        for d in DECODE_SCALES:
            if side >= size * d:
                return d
    return 1


def scaled_box(start: int, length: int, d: int, limit: int) -> tuple[int, int]:
    """[start, start + length) in full-resolution pixels -> the covering [lo, hi) at scale 1/d, within ``limit``."""
    return start // d, min(limit, (start + length + d - 1) // d)


RESAMPLE = {"linear": 1, "area": 3}  # OpenCV interpolation codes


def compiled(fn: Any) -> Any:
    """``numba.njit(fn, nogil=True)``: a fresh dispatcher per loader (and per caller). Not shared across loaders: one
    dispatcher compiled from two threads at once (one loader's decode thread and another's, or the main thread)
    lost an overload while numba listed them (KeyError in ``Dispatcher.signatures``)."""
    import numba

    return numba.njit(fn, nogil=True)


def compiled_crop(crop_scale: tuple[float, float] | None) -> Any:
    return compiled(center_crop) if crop_scale is None else compiled(make_crop_fn(tuple(crop_scale)))


def opencv_resize(interpolation: int) -> Any:
    """``resize(src, r0, r1, c0, c1, dst)``: OpenCV's resize of ``src[r0:r1, c0:c1]`` (uint8 HxWx3) into ``dst``,
    callable from numba without the GIL.

    ``area`` (INTER_AREA: a box filter when shrinking, antialiased) is FFCV's own kernel. ``linear`` (bilinear, no
    antialiasing, as SimCLR's reference TF code resizes; about 4x cheaper) goes through OpenCV's C API
    (``cvResize``) of the same OpenCV library FFCV links, because FFCV's ``resize`` hard-codes INTER_AREA."""
    import ctypes

    import numba
    from ffcv.libffcv import resize_crop

    if interpolation == RESAMPLE["area"]:
        return compiled(resize_crop)
    core, imgproc = (ctypes.CDLL(opencv_library(n)) for n in ("core", "imgproc"))
    header = core.cvInitMatHeader
    header.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    header.restype = ctypes.c_void_p
    cv_resize = imgproc.cvResize
    cv_resize.argtypes, cv_resize.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], None
    u8c3, mat_bytes = 16, 64  # CV_8UC3; sizeof(CvMat) is 40 on 64-bit

    @numba.njit(nogil=True)
    def resize(src, r0, r1, c0, c1, dst):
        mats = np.empty(2 * mat_bytes, np.uint8)
        row = src.shape[1] * 3
        header(mats.ctypes.data, r1 - r0, c1 - c0, u8c3, src.ctypes.data + r0 * row + c0 * 3, row)
        header(mats.ctypes.data + mat_bytes, dst.shape[0], dst.shape[1], u8c3, dst.ctypes.data, dst.shape[1] * 3)
        cv_resize(mats.ctypes.data, mats.ctypes.data + mat_bytes, interpolation)

    return resize


def opencv_library(module: str) -> str:
    """Path of the ``libopencv_<module>`` that FFCV's compiled library loaded (read from /proc/self/maps)."""
    import ffcv._libffcv  # noqa: F401 - loads OpenCV

    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if f"/libopencv_{module}.so" in path:
                return path
    raise RuntimeError(f"libopencv_{module} is not loaded by FFCV; use resample='area'")


def two_view_decoder(size: int, crop_scale: tuple[float, float] | None, seed: EpochSeed, *,
                     scaled_decode: bool = True, resample: str = "linear") -> Any:
    """An FFCV decoder for the ``image`` field: per sample, one decode and two crops -> uint8 ``(2, S, S, 3)``.

    ``crop_scale=None``: no random crop (both views are the centre square, as the torch path without 'crop').
    ``resample``: one of :data:`RESAMPLE` (see docs/performance.md for the cost and what each does to the pixels)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    if resample not in RESAMPLE:
        raise ValueError(f"resample: unknown {resample!r}; choose from {', '.join(RESAMPLE)}")

    class TwoViewCropDecoder(SimpleRGBImageDecoder):
        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, Any]:
            max_w, max_h = np.uint64(self.metadata["width"].max()), np.uint64(self.metadata["height"].max())
            shape, u8 = (2, size, size, 3), np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                    (AllocationQuery(shape, u8), AllocationQuery((max_h * max_w * np.uint64(3),), u8)))

        def generate_code(self) -> Any:
            jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = compiled(imdecode), opencv_resize(RESAMPLE[resample])
            crop_c = compiled_crop(crop_scale)
            scale_c, box_c = compiled(decode_scale), compiled(scaled_box)
            load_u64, address, scaled = load_u64_intrinsic(), seed.address, bool(scaled_decode)
            v0, v1 = np.uint64(0), np.uint64(1)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                epoch_seed = load_u64(address)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    sample = np.uint64(source_ix)
                    i0, j0, h0, w0 = crop_c(epoch_seed, sample, v0, height, width)
                    i1, j1, h1, w1 = crop_c(epoch_seed, sample, v1, height, width)
                    d = 1
                    if field["mode"] == jpg:
                        d = scale_c(size, h0, w0, h1, w1, scaled)
                        hs, ws = (int(height) + d - 1) // d, (int(width) + d - 1) // d
                        image = temp_storage[dst_ix]
                        imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, d, False, False)
                        image = image.reshape(-1)[: 3 * hs * ws].reshape(hs, ws, 3)
                    else:
                        hs, ws = int(height), int(width)
                        image = image_data.reshape(hs, ws, 3)
                    r0, r1 = box_c(i0, h0, d, hs)
                    c0, c1 = box_c(j0, w0, d, ws)
                    resize_crop_c(image, r0, r1, c0, c1, destination[dst_ix, 0])
                    r0, r1 = box_c(i1, h1, d, hs)
                    c0, c1 = box_c(j1, w1, d, ws)
                    resize_crop_c(image, r0, r1, c0, c1, destination[dst_ix, 1])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return TwoViewCropDecoder()
