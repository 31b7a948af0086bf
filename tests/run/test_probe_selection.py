"""The baselines' own choices: kNN's k on validation (never the test split), and a random-init encoder whose
BatchNorm statistics come from the images it is probed on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from simclr_dist.core.models import build_backbone, recalibrate_batchnorm
from simclr_dist.run.train.evaluation import Features, grid_edge_of, knn_select_features


def two_clusters(n_per: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return centres[y] + noise * torch.randn(len(y), 2, generator=g), y


def test_knn_k_is_chosen_on_validation_and_the_test_split_cannot_change_it():
    # a minority of mislabelled training points: k=1 copies their labels, a wider vote outvotes them
    x, y = two_clusters(100, 0.25)
    flip = torch.arange(0, 200, 7)
    y_noisy = y.clone()
    y_noisy[flip] = 1 - y_noisy[flip]
    test_x, test_y = two_clusters(50, 0.25, seed=1)
    perm = np.random.default_rng(0).permutation(200)
    splits = [(np.sort(perm[:150]), np.sort(perm[150:]))]
    out = knn_select_features(Features(x, y_noisy, test_x, test_y), num_classes=2, ks=(1, 15, 60), splits=splits)
    assert out["k"] in (15, 60) and out["val_top1_by_k"]["1"] < out["val_top1_by_k"][str(out["k"])]
    assert out["grid_edge"] in (None, "high")
    # the test labels play no part in the choice: scramble them, the same k comes back
    scrambled = knn_select_features(Features(x, y_noisy, test_x, test_y[torch.randperm(100)]), num_classes=2,
                                    ks=(1, 15, 60), splits=splits)
    assert scrambled["k"] == out["k"] and scrambled["val_top1_by_k"] == out["val_top1_by_k"]


def test_knn_k_is_capped_at_the_labels_a_split_fits_on():
    x, y = two_clusters(10, 0.1)
    splits = [(np.arange(0, 20, 2), np.arange(1, 20, 2))]  # 10 fit images
    out = knn_select_features(Features(x, y, x, y), num_classes=2, ks=(3, 200), splits=splits)
    assert set(out["val_top1_by_k"]) == {"3", "10"}


def test_grid_edge_of():
    assert grid_edge_of(1e-6, [1e-6, 1e-3, 1.0]) == "low" and grid_edge_of(1.0, [1e-6, 1e-3, 1.0]) == "high"
    assert grid_edge_of(1e-3, [1e-6, 1e-3, 1.0]) is None and grid_edge_of(5, [5]) is None


def test_recalibrated_batchnorm_holds_the_images_statistics_and_no_weight_moves():
    torch.manual_seed(0)
    encoder, _ = build_backbone("resnet18", cifar_stem=True, width=0.25)
    images = 3.0 + 2.0 * torch.randn(40, 3, 16, 16)  # far from the initial mean 0 / variance 1
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k and "num_batches" not in k}
    first_bn = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    first_conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    encoder.eval()
    before = encoder(images[:4]).detach()
    seen = recalibrate_batchnorm(encoder, [images[:25], images[25:]])
    assert seen == 40 and not encoder.training and first_bn.momentum == 0.1
    # what the first BatchNorm saw: the cumulative average of the two batches' means and (unbiased) variances,
    # not the EMA that starts from initialisation
    with torch.no_grad():
        acts = [first_conv(b).transpose(0, 1).flatten(1) for b in (images[:25], images[25:])]  # (C, B*H*W)
    assert torch.allclose(first_bn.running_mean, (acts[0].mean(1) + acts[1].mean(1)) / 2, atol=1e-4)
    assert torch.allclose(first_bn.running_var, (acts[0].var(1) + acts[1].var(1)) / 2, rtol=1e-3)
    for k, v0 in weights.items():
        assert torch.equal(encoder.state_dict()[k], v0), k
    assert not torch.allclose(encoder(images[:4]), before)


def test_recalibrate_refuses_no_images():
    encoder, _ = build_backbone("resnet18", cifar_stem=True, width=0.25)
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(encoder, [])
