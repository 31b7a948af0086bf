"""The switches the ablation studies turn: the loss without l2 normalisation (Table 5), the validation linear probe
(the sweeps' objective) and the second view's own augmentation (Figure 5's one-branch setting)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simclr_dist.config import ConfigError, PretrainConfig, parse_config
from simclr_dist.core.loss import NTXentLoss, nt_xent
from simclr_dist.core.probe import probe_accuracy


def raw_dot_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent with sim(u, v) = u.v (no normalisation), written out per anchor."""
    z = torch.cat([z1, z2]).double()
    n, b = len(z), len(z1)
    total = z.new_zeros(())
    for i in range(n):
        j = (i + b) % n
        logits = torch.stack([z[i] @ z[k] / temperature for k in range(n) if k != i])
        pos = [k for k in range(n) if k != i].index(j)
        total = total - torch.log_softmax(logits, 0)[pos]
    return total / n


def test_loss_without_normalisation_scores_raw_dot_products():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, 2.0, normalize=False), raw_dot_nt_xent(z1, z2, 2.0))
    # normalised: invariant to the projections' scale; raw: not
    torch.testing.assert_close(nt_xent(3 * z1, 3 * z2, 0.5), nt_xent(z1, z2, 0.5))
    assert not torch.allclose(nt_xent(3 * z1, 3 * z2, 0.5, normalize=False), nt_xent(z1, z2, 0.5, normalize=False))
    torch.testing.assert_close(NTXentLoss(0.5, normalize=False)(z1, z2), nt_xent(z1, z2, 0.5, normalize=False))
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), nt_xent(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.5,
                                                             normalize=False))


def test_validation_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = 3 * torch.randn(4, 16, generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g)
    acc = probe_accuracy(x[:300], y[:300], x[300:], y[300:], num_classes=4)
    assert acc["linear_top1"] > 0.95 and acc["linear_top5"] == 1.0
    noise = torch.randn(400, 16, generator=g)
    acc = probe_accuracy(noise[:300], y[:300], noise[300:], y[300:], num_classes=4)
    assert acc["linear_top1"] < 0.45  # chance is 0.25


def test_second_view_augmentation_flag_resolves_and_validates():
    cfg = parse_config(["--augment", "color,crop", "--augment2", "crop"]).validate().resolved()
    assert (cfg.augment, cfg.augment2) == ("crop,color", "crop")
    assert parse_config([]).resolved().augment2 is None  # default: the second view is drawn like the first
    assert parse_config(["--augment2", "none"]).resolved().augment2 == "none"
    with pytest.raises(ConfigError, match=r"^--augment2: unknown augmentation component 'colour'") as e:
        PretrainConfig(augment2="crop,colour").validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--augment2: the ffcv loader crops both views alike"):
        parse_config(["--loader", "ffcv", "--augment", "crop,color", "--augment2", "color"]).validate().resolved().validate()
    assert parse_config(["--loader", "torch", "--augment", "crop,color", "--augment2", "color"]).validate()
    assert parse_config(["--no-proj-normalize", "--linear-probe"]).proj_normalize is False
