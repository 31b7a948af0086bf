import pytest
import torch
import torch.nn as nn
import torchvision

from simclr_dist.core.models import (
    ARCHS,
    ProjectionHead,
    SimCLRModel,
    build_backbone,
    count_parameters,
    forward_flops,
)


@pytest.mark.parametrize("arch,expansion", [("resnet18", 1), ("resnet34", 1), ("resnet50", 4)])
def test_backbone_output_shape(arch: str, expansion: int) -> None:
    encoder, feat_dim = build_backbone(arch, width=0.25)
    assert feat_dim == 128 * expansion
    assert not hasattr(encoder, "fc")
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, feat_dim)


def test_resnet50_full_width_shape() -> None:
    encoder, feat_dim = build_backbone("resnet50")
    assert feat_dim == 2048
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def _layer1_input_size(encoder: nn.Module, px: int) -> tuple[int, int]:
    seen = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        seen["hw"] = tuple(args[0].shape[-2:])

    encoder.layer1.register_forward_pre_hook(hook)
    encoder(torch.randn(2, 3, px, px))
    return seen["hw"]


def test_cifar_stem() -> None:
    encoder, _ = build_backbone("resnet18", cifar_stem=True, width=0.25)
    conv = encoder.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert not any(isinstance(m, nn.MaxPool2d) for m in encoder.modules())
    assert _layer1_input_size(encoder, 32) == (32, 32)

    imagenet, _ = build_backbone("resnet18", width=0.25)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert _layer1_input_size(imagenet, 32) == (8, 8)


def test_width_scales_every_stage() -> None:
    encoder, feat_dim = build_backbone("resnet50", width=2)
    assert feat_dim == 4096
    assert encoder.conv1.out_channels == 128
    assert encoder.layer1[0].conv1.out_channels == 128  # bottleneck interior widened too
    assert encoder.layer4[-1].conv3.out_channels == 4096

    tiny, tiny_dim = build_backbone("resnet18", width=0.125)
    assert tiny.conv1.out_channels == 8 and tiny_dim == 64
    assert build_backbone("resnet18", width=0.001)[1] == 1  # channels never drop to 0


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_torchvision(arch: str) -> None:
    ours = build_backbone(arch)[0].state_dict()
    ref = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    build_backbone(arch)[0].load_state_dict(ref)  # strict load of a torchvision checkpoint works


def test_projection_head() -> None:
    head = ProjectionHead(64, 32, 16)
    kinds = [type(m) for m in head.children()]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.fc1.bias is None and head.fc1.in_features == 64 and head.fc1.out_features == 32
    assert head.bn1.num_features == 32
    assert head.fc2.bias is not None and head.fc2.out_features == 16
    assert head(torch.randn(4, 64)).shape == (4, 16)


def test_simclr_model() -> None:
    model = SimCLRModel("resnet18", cifar_stem=True, width=0.25)
    assert model.feat_dim == 128
    assert model.head.fc1.out_features == 128  # hidden defaults to feat_dim
    h, z = model(torch.randn(4, 3, 32, 32))
    assert h.shape == (4, 128) and z.shape == (4, 128)

    model = SimCLRModel("resnet18", width=0.25, proj_hidden_dim=64, proj_out_dim=32)
    assert model.head.fc1.out_features == 64
    assert model(torch.randn(2, 3, 32, 32))[1].shape == (2, 32)
    assert count_parameters(model) == count_parameters(model.encoder) + count_parameters(model.head)


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    assert count_parameters(build_backbone("resnet50")[0]) == count_parameters(torchvision.models.resnet50()) - (
        2048 * 1000 + 1000
    )


@pytest.mark.parametrize("arch", ["nope", "resnet101", "ResNet18"])
def test_bad_arch(arch: str) -> None:
    with pytest.raises(ValueError, match="resnet18.*resnet34.*resnet50") as err:
        build_backbone(arch)
    assert repr(arch) in str(err.value)


@pytest.mark.parametrize("width", [0, -1, 8.5, float("nan"), float("inf"), True, "2"])
def test_bad_width(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=width)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch,gmacs", [("resnet18", 1.8e9), ("resnet50", 4.1e9)])
def test_forward_flops(arch: str, gmacs: float) -> None:
    encoder, _ = build_backbone(arch)
    assert forward_flops(encoder, (3, 224, 224)) == pytest.approx(2 * gmacs, rel=0.05)


def test_forward_flops_leaves_model_untouched() -> None:
    model = SimCLRModel("resnet18", width=0.25)
    model.train()
    model.head.bn1.eval()  # mixed modes must be restored exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = forward_flops(model, (3, 32, 32))
    assert flops > forward_flops(model.encoder, (3, 32, 32)) > 0
    assert model.training and model.encoder.training and not model.head.bn1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
