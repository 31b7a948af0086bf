"""Augmentation tests: each named component, view/eval agreement, dataset-aware defaults."""

import pytest
import torch
from PIL import Image

from simclr_dist.data import (
    COMPONENTS,
    RECIPE,
    AugmentConfig,
    TwoViewDataset,
    TwoViewTransform,
    build_eval_transform,
    build_view_transform,
    dataset_info,
    default_augment,
    parse_components,
)
from simclr_dist.data.augment import blur_kernel


@pytest.fixture
def img() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)


def test_parse_components():
    assert parse_components("crop,color") == ("crop", "color")
    assert parse_components(" Color , crop,crop ") == ("crop", "color")  # canonical order, deduped
    assert parse_components(["blur", "flip"]) == ("flip", "blur")
    assert parse_components("") == parse_components("none") == parse_components([]) == ()
    assert parse_components(",".join(COMPONENTS)) == COMPONENTS
    with pytest.raises(ValueError, match="unknown augmentation component 'jitter'.*crop, flip"):
        parse_components("crop,jitter")


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_alone(component, img):
    view = build_view_transform(AugmentConfig(components=(component,), image_size=24))
    out = view(img)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 24, 24)
    assert torch.isfinite(out).all()


def test_full_pipeline_accepts_pil_and_views_differ(img):
    pair = TwoViewTransform(build_view_transform(AugmentConfig(components=COMPONENTS, image_size=32)))
    v1, v2 = pair(Image.fromarray(img.permute(1, 2, 0).numpy()))
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)
    r1, r2 = TwoViewTransform(build_view_transform(AugmentConfig()))(img)
    assert not torch.equal(r1, r2)


def test_no_components_equals_eval_transform(img):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    view = build_view_transform(AugmentConfig(components=(), image_size=24, mean=mean, std=std))
    ev = build_eval_transform(24, mean, std)
    assert torch.equal(view(img), ev(img))
    assert torch.equal(view(img), view(img))  # deterministic
    wide = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    assert ev(wide).shape == (3, 24, 24)


def test_gray_always_gives_equal_channels(img):
    cfg = AugmentConfig(components=("gray",), image_size=40, gray_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    out = build_view_transform(cfg)(img)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_sobel_finds_edges_and_rotate_is_exact():
    step = torch.zeros(3, 16, 16, dtype=torch.uint8)
    step[:, :, 8:] = 255
    plain = dict(image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    edges = build_view_transform(AugmentConfig(components=("sobel",), **plain))(step)
    assert edges[:, :, 7:9].min() > 0.9 and edges[:, :, :6].max() == 0 and torch.equal(edges[0], edges[2])
    rot = build_view_transform(AugmentConfig(components=("rotate",), **plain))
    torch.manual_seed(0)
    outs = {tuple(rot(step).flatten().tolist()) for _ in range(40)}
    assert len(outs) == 4  # 0/90/180/270 of a step edge are all distinct, values untouched


def test_blur_kernel_matches_paper():
    assert blur_kernel(224) == 23 and blur_kernel(32) == 3 and blur_kernel(96) % 2 == 1


def test_config_validates():
    assert AugmentConfig(components="color,crop").components == ("crop", "color")
    with pytest.raises(ValueError, match="gray_p"):
        AugmentConfig(gray_p=1.5)
    with pytest.raises(ValueError, match="unknown augmentation component"):
        AugmentConfig(components=("sharpen",))


def test_default_augment_rules():
    digits = default_augment(dataset_info("digits"))
    assert "flip" not in digits.components and "blur" not in digits.components
    assert digits.crop_scale == (0.2, 1.0) and digits.jitter_strength == 0.5 and digits.image_size == 32
    cifar = default_augment(dataset_info("cifar10"))
    assert cifar.components == ("crop", "flip", "color", "gray") and cifar.jitter_strength == 0.5
    assert cifar.mean == dataset_info("cifar10").mean
    imnet = default_augment(dataset_info("imagenet"))
    assert imnet.components == RECIPE and imnet.jitter_strength == 1.0 and imnet.image_size == 224
    custom = default_augment(dataset_info("cifar10"), "crop,blur", image_size=64, jitter_strength=0.3)
    assert (custom.components, custom.image_size, custom.jitter_strength) == (("crop", "blur"), 64, 0.3)
    assert default_augment(dataset_info("imagenet"), "none").components == ()


def test_two_view_dataset():
    base = [(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), i % 3) for i in range(5)]
    ds = TwoViewDataset(base, TwoViewTransform(build_view_transform(AugmentConfig(image_size=16))))
    assert len(ds) == 5
    v1, v2, label = ds[4]
    assert v1.shape == v2.shape == (3, 16, 16) and label == 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 3, 16, 16) and batch[2].tolist() == [0, 1, 2, 0, 1]
