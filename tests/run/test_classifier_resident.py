"""The classifiers' resident batches (simclr_dist.data.classifier_batches) against the torch path they replace on a
GPU: the same values for the same crop corner and flip, the same distribution of corners and flips, the same
samples in the same batches, draws that depend on (seed, epoch, batch) only; and the classifier loop on the CPU
with ``--classifier-loader auto`` exactly as before (the torch path), a resident run resumed bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, DistributedSampler

from simclr_dist import supervised as sup
from simclr_dist.config import ConfigError
from simclr_dist.config.supervised import CLUSTER_FIELDS, SupervisedConfig
from simclr_dist.core.knn import TransformedSubset
from simclr_dist.data.classifier_batches import (ResidentClassifierBatches, loader_kind, normalise, pad_crop,
                                                 padcrop_params)
from simclr_dist.data.datasets import TensorImageDataset
from simclr_dist.data.resident import global_batch_seed
from simclr_dist.run.store.checkpoint import load_checkpoint
from simclr_dist.run.train.classify_loop import classifier_transform
from simclr_dist.run.train.evaluation import EvalData

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = (0.2860,) * 3, (0.3530,) * 3  # Fashion-MNIST's


def images(n: int, size: int = 28, grey: bool = True, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): grey images as one plane expanded (as load_dataset holds them), or colour."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1 if grey else 3, size, size), generator=g, dtype=torch.uint8)
    return x.expand(-1, 3, -1, -1) if grey else x


def eval_data(x: torch.Tensor, labels: torch.Tensor, dataset: str = "fashion-mnist") -> EvalData:
    train = TensorImageDataset(x, labels, [str(c) for c in range(10)])
    return EvalData(dataset, train, train, labels.numpy(), 10, x.shape[-1], MEAN, STD)


def batches(x: torch.Tensor, labels: torch.Tensor, components: str = "padcrop,flip", **kw) -> ResidentClassifierBatches:
    args = dict(components=components, dataset="fashion-mnist", image_size=x.shape[-1], mean=MEAN, std=STD,
                batch_size=16, drop_last=True, seed=3)
    return ResidentClassifierBatches(x, labels, **{**args, **kw})


def torch_op(img: torch.Tensor, top: int, left: int, flip: bool, pad: int) -> torch.Tensor:
    """torchvision's functional ops of the supervised recipe at a given corner and flip."""
    s = img.shape[-1]
    out = TF.crop(TF.pad(img, [pad]), top, left, s, s)
    out = TF.horizontal_flip(out) if flip else out
    return TF.normalize(TF.to_dtype(out, torch.float32, scale=True), list(MEAN), list(STD))


# ---------------------------------------------------------------------------- values and distribution
@pytest.mark.parametrize("grey, size", [(True, 28), (False, 32), (True, 16)])
def test_pad_crop_flip_normalise_equal_torchvision_for_the_same_corner(grey, size):
    x = images(24, size, grey)
    pad = size // 8
    g = torch.Generator().manual_seed(1)
    top, left = torch.randint(0, 2 * pad + 1, (2, 24), generator=g)
    flip = torch.rand(24, generator=g) < 0.5
    crops = pad_crop(x, top, left, pad)  # (24, 3, S, S) uint8
    flipped = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
    out = normalise(flipped, torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))
    for i in range(24):
        assert torch.equal(crops[i], TF.crop(TF.pad(x[i], [pad]), int(top[i]), int(left[i]), size, size))
        assert torch.equal(out[i], torch_op(x[i], int(top[i]), int(left[i]), bool(flip[i]), pad)), i


def test_every_torch_path_view_is_one_of_the_resident_candidates():
    """The whole torch transform (ToImage, Resize, CenterCrop, RandomCrop, flip, ToDtype, Normalize) gives, for
    each of its draws, exactly one of the 2 x 7 x 7 views the resident ops can give: the same support, bit for bit."""
    x = images(1)
    pad = 28 // 8
    corners = [(t, l, f) for t in range(2 * pad + 1) for l in range(2 * pad + 1) for f in (False, True)]
    n = len(corners)
    top, left, flip = (torch.tensor([c[k] for c in corners]) for k in range(3))
    crops = pad_crop(x.expand(n, -1, -1, -1), top, left, pad)
    candidates = normalise(torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops),
                           torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))
    transform = classifier_transform("padcrop,flip", eval_data(x, torch.zeros(1, dtype=torch.long)))
    hits = set()
    for seed in range(60):
        torch.manual_seed(seed)
        view = transform(x[0])
        match = [i for i in range(n) if torch.equal(candidates[i], view)]
        assert len(match) >= 1, seed
        hits.add(match[0])
    assert len(hits) > 25  # many corners reached, not one by accident


def test_corners_and_flips_are_uniform_and_independent():
    """RandomCrop's corner is uniform on [0, 2p]^2 and the flip has p = 0.5: counts over 64,000 draws."""
    pad, n, reps = 3, 64, 1000
    tops, lefts, flips = [], [], []
    g = torch.Generator()
    for b in range(reps):
        t, l, f = padcrop_params(g.manual_seed(global_batch_seed(0, 0, b)), (0, 1), n, pad, torch.device("cpu"))
        tops.append(t), lefts.append(l), flips.append(f)
    t, l, f = torch.cat(tops), torch.cat(lefts), torch.cat(flips)
    total = n * reps
    assert int(t.min()) == int(l.min()) == 0 and int(t.max()) == int(l.max()) == 2 * pad
    joint = torch.bincount(t * (2 * pad + 1) + l, minlength=(2 * pad + 1) ** 2).double()
    expected = total / (2 * pad + 1) ** 2
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 48 degrees of freedom: the 99.99th percentile is about 90
    assert abs(float(f.double().mean()) - 0.5) < 4 * math.sqrt(0.25 / total)


def test_views_match_the_torch_path_in_distribution():
    """Mean and spread of each output pixel over 3,000 augmentations of one image: resident vs the torch path."""
    x = images(1, seed=5)
    n = 3000
    transform = classifier_transform("padcrop,flip", eval_data(x, torch.zeros(1, dtype=torch.long)))
    torch.manual_seed(0)
    ref = torch.stack([transform(x[0]) for _ in range(n)])  # (n, 3, 28, 28)
    src = batches(x.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), batch_size=n)
    mine = src.batch(torch.arange(n), epoch=0, batch=0)
    assert mine.shape == ref.shape and mine.dtype == ref.dtype
    # per-pixel mean: the standard error is about sd / sqrt(n) ~ 1.4 / 55; 6 of them across 2,352 pixels
    assert float((mine.mean(0) - ref.mean(0)).abs().max()) < 6 * float(ref.std(0).max()) / math.sqrt(n)
    assert float((mine.std(0) - ref.std(0)).abs().max()) < 0.15
    zero = (torch.tensor(0.0) - MEAN[0]) / STD[0]  # a padded pixel
    assert float((mine == zero).double().mean()) == pytest.approx(float((ref == zero).double().mean()), abs=0.01)


def test_simclr_components_stay_in_distribution():
    """--augment simclr (RandomResizedCrop + flip) through the resident pretraining ops, one view per sample."""
    x = images(1, seed=2)
    n = 2000
    transform = classifier_transform("crop,flip", eval_data(x, torch.zeros(1, dtype=torch.long)))
    torch.manual_seed(0)
    ref = torch.stack([transform(x[0]) for _ in range(n)])
    src = batches(x.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), "crop,flip", batch_size=n)
    mine = src.batch(torch.arange(n), epoch=0, batch=0)
    assert mine.shape == ref.shape
    assert float((mine.mean(0) - ref.mean(0)).abs().mean()) < 0.05
    assert float(mine.std()) == pytest.approx(float(ref.std()), rel=0.05)


# ---------------------------------------------------------------------------- order and draws
@pytest.mark.parametrize("n, batch, world, drop_last", [(100, 16, 1, True), (100, 16, 1, False), (37, 8, 2, True),
                                                        (37, 8, 2, False), (10, 16, 1, False)])
def test_same_samples_in_the_same_batches_as_the_dataloader(n, batch, world, drop_last):
    x = images(n)
    labels = torch.arange(n)  # the label names the sample
    for rank in range(world):
        src = batches(x, labels, batch_size=batch, drop_last=drop_last, rank=rank, world=world)
        ds = TransformedSubset(TensorImageDataset(x, labels, ["c"]), lambda im: im, list(range(n)))
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=drop_last)
        assert len(src) == len(loader)
        for epoch in (0, 4):
            src.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert [y.tolist() for _, y in src] == [y.tolist() for _, y in loader]


def test_draws_depend_on_seed_epoch_batch_only_and_ranks_split_the_global_batch():
    x, labels = images(64), torch.arange(64) % 10
    a, b = batches(x, labels), batches(x, labels)
    a.set_epoch(2), b.set_epoch(2)
    first = [v for v, _ in a]
    for (v, _), w in zip(b, first):  # a fresh object (a resumed run) at the same epoch: the same batches
        assert torch.equal(v, w)
    b.set_epoch(3)
    assert not torch.equal(next(iter(b))[0], first[0])
    c = batches(x, labels, seed=4)
    c.set_epoch(2)
    assert not torch.equal(next(iter(c))[0], first[0])
    # two ranks of 8 = one rank of 16: rank r holds rows r::2 of the global batch
    whole = batches(x, labels, batch_size=16)
    whole.set_epoch(1)
    ranks = [batches(x, labels, batch_size=8, rank=r, world=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    for (v, y), (v0, y0), (v1, y1) in zip(whole, *ranks):
        assert torch.equal(v[0::2], v0) and torch.equal(v[1::2], v1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_loader_rule_and_bad_inputs():
    x, labels = images(8), torch.zeros(8, dtype=torch.long)
    held = TensorImageDataset(x, labels, ["c"])
    assert loader_kind("auto", torch.device("cpu"), held, 28) == "torch"  # the CPU keeps the torch path
    assert loader_kind("auto", torch.device("cuda", 0), held, 28) == "resident"
    assert loader_kind("auto", torch.device("cuda", 0), held, 32) == "torch"  # held at another size
    assert loader_kind("resident", torch.device("cpu"), held, 28) == "resident"
    assert loader_kind("torch", torch.device("cuda", 0), held, 28) == "torch"
    with pytest.raises(ValueError, match="in-memory dataset"):
        loader_kind("resident", torch.device("cpu"), [(x[0], 0)], 28)
    with pytest.raises(ValueError, match="uint8"):
        batches(x.float(), labels)
    grey = batches(x, labels)
    assert grey.images.shape == (8, 1, 28, 28)  # three equal planes held as one
    assert batches(images(8, grey=False), labels).images.shape == (8, 3, 28, 28)


# ---------------------------------------------------------------------------- the config and the loop
def test_config_field_is_validated_and_leaves_the_experiment_key_alone():
    base = SupervisedConfig(dataset="fashion-mnist", fraction=0.01, lr=0.1, augment="padcrop,flip")
    assert base.classifier_loader == "auto" and "classifier_loader" in CLUSTER_FIELDS
    old = {k: v for k, v in base.to_dict().items() if k != "classifier_loader"}  # a run saved before the field
    assert SupervisedConfig.from_dict(old).experiment_key() == base.experiment_key()
    assert "classifier_loader" not in base.experiment_key()
    forced = SupervisedConfig(**{**base.to_dict(), "classifier_loader": "resident"})
    assert forced.validate().experiment_key() == base.experiment_key()  # how batches are made, not what is learnt
    with pytest.raises(ConfigError, match="^--classifier-loader: unknown loader 'gpu'"):
        SupervisedConfig(classifier_loader="gpu").validate()
    with pytest.raises(ConfigError, match="^--classifier-loader: resident holds in-memory datasets only"):
        SupervisedConfig(dataset="imagenet", data_root="/x", classifier_loader="resident").validate()


ARGS = ["--no-ray", "--fraction", "0.3", "--batch-size", "32", "--image-size", "16", "--width", "0.125",
        "--epochs", "2", "--schedule", "constant", "--lr", "0.2"]


def run(tmp_path, name: str, *extra: str) -> dict:
    assert sup.main([*ARGS, "--storage-path", str(tmp_path), "--name", name, *extra]) == 0
    return json.loads((tmp_path / name / "results.json").read_text())


def test_cpu_auto_is_the_torch_path_exactly_and_resident_resumes_bit_for_bit(tmp_path):
    """On the CPU ``auto`` trains exactly what ``torch`` trains (the same draws, the same numbers); a resident run
    stopped after epoch 1 and rerun ends with the weights of an uninterrupted one."""
    auto, plain = run(tmp_path, "auto"), run(tmp_path, "torch", "--classifier-loader", "torch")
    assert auto["classifier_loader"] == plain["classifier_loader"] == "torch"
    assert auto["history"] == [{**h, "epoch_time_s": a["epoch_time_s"]}
                               for h, a in zip(plain["history"], auto["history"])]
    assert auto["predictions"] == plain["predictions"] and auto["top1"] == plain["top1"]
    wa, wp = load_checkpoint(auto["checkpoint"])["model"], load_checkpoint(plain["checkpoint"])["model"]
    assert all(torch.equal(wa[k], wp[k]) for k in wa)

    ref = run(tmp_path, "res", "--classifier-loader", "resident")
    assert ref["classifier_loader"] == "resident"
    assert [h["images"] for h in ref["history"]] == [h["images"] for h in plain["history"]]  # the same batches
    losses, torch_losses = [h["train_loss"] for h in ref["history"]], [h["train_loss"] for h in plain["history"]]
    assert losses != torch_losses and losses[1] < losses[0]  # other draws, the same learning
    assert losses == pytest.approx(torch_losses, abs=0.1)
    # the same run, stopped after epoch 1: its last checkpoint and results removed, then rerun
    shutil.copytree(tmp_path / "res", tmp_path / "cut")
    cut = tmp_path / "cut"
    for d in cut.glob("checkpoint_local_000002"):
        shutil.rmtree(d)
    (cut / "results.json").unlink()
    cfg = json.loads((cut / "supervised_config.json").read_text())
    (cut / "supervised_config.json").write_text(json.dumps({**cfg, "name": "cut"}))
    again = run(tmp_path, "cut", "--classifier-loader", "resident")
    assert again["resumed_from_epoch"] == 1 and again["history"][1]["train_loss"] == ref["history"][1]["train_loss"]
    w1, w2 = load_checkpoint(ref["checkpoint"])["model"], load_checkpoint(again["checkpoint"])["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert np.array_equal(again["predictions"], ref["predictions"])
