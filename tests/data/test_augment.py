"""Augmentation tests: each named component, view/eval agreement, dataset-aware defaults."""

import pytest
import torch
from PIL import Image

from simclr_dist.data import (
    COLOR_OPS,
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
from simclr_dist.data.augment import blur_kernel, jitter_ranges


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


def test_fashion_mnist_recipe_is_for_grey_clothes():
    fm = default_augment(dataset_info("fashion-mnist"))
    assert fm.components == ("crop", "flip", "color") and fm.color_ops == ("brightness", "contrast")
    assert fm.crop_scale == (0.2, 1.0) and fm.image_size == 28 and jitter_ranges(fm) == (0.4, 0.4, 0.0, 0.0)
    # digits and CIFAR keep the paper's four jitter ops at 0.8s/0.8s/0.8s/0.2s
    for name in ("digits", "cifar10"):
        aug = default_augment(dataset_info(name))
        assert aug.color_ops == COLOR_OPS and jitter_ranges(aug) == (0.4, 0.4, 0.4, 0.1)
    with pytest.raises(ValueError, match="unknown colour op 'sparkle'"):
        AugmentConfig(color_ops=("hue", "sparkle"))


@pytest.mark.parametrize("batched", [False, True])
def test_color_ops_restrict_the_jitter_in_both_paths(batched):
    """Brightness alone scales every pixel of a view by one factor: saturation and hue really are off."""
    from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment

    cfg = AugmentConfig(components="color", image_size=8, color_p=1.0, color_ops=("brightness",), mean=(0, 0, 0),
                        std=(1, 1, 1))
    torch.manual_seed(0)
    x = torch.randint(100, 141, (4, 3, 8, 8), dtype=torch.uint8)  # colourful, never clipped at 1.8x
    if batched:
        out = BatchedViewAugment(cfg)(x, torch.Generator().manual_seed(0))
    else:
        view = build_view_transform(cfg)
        out = torch.stack([view(img) for img in x])
    ratio = out / (x.float() / 255)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), rtol=0, atol=0.02)
    assert not torch.allclose(per_image[:, 0], torch.ones(4), atol=0.05)  # it did jitter


@pytest.mark.parametrize("dataset", ["digits", "fashion-mnist", "cifar10", "stl10", "imagenet"])
def test_resolved_config_records_the_recipe_the_loader_uses(dataset):
    """Issue 12: the config holds the concrete components and strength, and building the recipe from them gives
    exactly the recipe the loaders built from ``None`` before."""
    from simclr_dist.config import parse_config

    cfg = parse_config(["--dataset", dataset, "--data-root", "/data"]).resolved()
    info = dataset_info(dataset)
    assert cfg.augment != "" and cfg.jitter_strength is not None
    before = default_augment(info, None, image_size=cfg.image_size)
    assert default_augment(info, cfg.augment, image_size=cfg.image_size, jitter_strength=cfg.jitter_strength) == before
    assert cfg.resolved().augment == cfg.augment  # idempotent
    expected = {"digits": "crop,color,gray", "fashion-mnist": "crop,flip,color", "cifar10": "crop,flip,color,gray",
                "stl10": "crop,flip,color,gray,blur", "imagenet": "crop,flip,color,gray,blur"}[dataset]
    assert cfg.augment == expected and cfg.jitter_strength == (1.0 if info.image_size > 32 else 0.5)
    assert parse_config(["--augment", "none"]).resolved().augment == "none"
    assert parse_config(["--augment", "color,crop", "--jitter-strength", "0.3"]).resolved().augment == "crop,color"
