import math

import pytest
import torch
import torch.nn as nn

from simclr_dist.core.optim import LARS, WarmupCosine, build_optimizer, param_groups, scale_lr


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5, bias=False),
        nn.BatchNorm1d(5),
        nn.Linear(5, 2),
    )


def test_scale_lr() -> None:
    assert scale_lr(0.3, 4096) == pytest.approx(4.8)
    assert scale_lr(0.3, 256) == pytest.approx(0.3)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_lr(0.1, 1024, "none") == 0.1
    with pytest.raises(ValueError, match="cube"):
        scale_lr(0.1, 256, "cube")
    with pytest.raises(ValueError):
        scale_lr(0.1, 0)


def test_param_groups() -> None:
    net = _net()
    net[0].bias.requires_grad_(False)
    decay, excluded = param_groups(net, 1e-6)
    assert decay["weight_decay"] == 1e-6 and not decay["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net[0].weight, net[5].weight, net[7].weight])
    norm_and_bias = [net[1].weight, net[1].bias, net[6].weight, net[6].bias, net[7].bias]
    assert ids(excluded["params"]) == ids(norm_and_bias)  # frozen net[0].bias skipped


def test_lars_hand_computed() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.5},
            {"params": [b], "weight_decay": 0.5, "lars_exclude": True},  # wd must be ignored here
        ],
        lr=0.1,
        momentum=0.9,
        trust_coefficient=0.01,
        eps=0.0,
    )
    w.grad = torch.tensor([[0.5, -1.0]])
    b.grad = torch.tensor([0.2, -0.4])
    opt.step()
    # g = grad + 0.5 * w = [2, 1]; ||g|| = sqrt(5); trust = 0.01 * 5 / sqrt(5) = 0.01 * sqrt(5)
    trust = 0.01 * math.sqrt(5)
    buf_w = torch.tensor([[2.0, 1.0]]) * trust
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * buf_w)
    torch.testing.assert_close(b.detach(), torch.tensor([0.98, 2.04]))  # plain SGD: b - lr * grad
    torch.testing.assert_close(opt.state[b]["momentum_buffer"], torch.tensor([0.2, -0.4]))
    torch.testing.assert_close(w.grad, torch.tensor([[0.5, -1.0]]))  # grads untouched

    # second step: heavy-ball momentum on the trust-scaled update
    w_prev = w.detach().clone()
    w.grad = torch.tensor([[1.0, 0.0]])
    b.grad = torch.tensor([1.0, 1.0])
    opt.step()
    g = torch.tensor([[1.0, 0.0]]) + 0.5 * w_prev
    trust2 = 0.01 * w_prev.norm() / g.norm()
    buf_w = 0.9 * buf_w + trust2 * g
    torch.testing.assert_close(w.detach(), w_prev - 0.1 * buf_w)
    torch.testing.assert_close(b.detach(), torch.tensor([0.98, 2.04]) - 0.1 * torch.tensor([1.18, 0.64]))


def test_lars_zero_norm_falls_back_to_unit_trust() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.5, weight_decay=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()  # ||w|| = 0 -> trust 1, a plain SGD step
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.5))


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_lars_invariant_to_gradient_scale(scale: float) -> None:
    torch.manual_seed(0)
    init = _net().state_dict()
    grads = [[torch.randn_like(p) for p in _net().parameters()] for _ in range(3)]

    def run(gscale: float) -> tuple[dict, dict]:
        net = _net()
        net.load_state_dict(init)
        opt = LARS(param_groups(net, 0.0), lr=0.5, weight_decay=0.0)
        for step_grads in grads:
            for p, g in zip(net.parameters(), step_grads):
                p.grad = g * gscale
            opt.step()
        return dict(net.named_parameters()), {n: id(p) for n, p in net.named_parameters() if p.ndim > 1}

    ref, _ = run(1.0)
    scaled, weights = run(scale)
    for name in weights:  # LARS-adapted params: same trajectory whatever the gradient scale
        torch.testing.assert_close(scaled[name], ref[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scaled["7.bias"], ref["7.bias"])  # excluded params see the raw scale


def test_lars_step_never_reads_values_on_host() -> None:
    # On meta tensors any .item()/bool()/data-dependent branch raises, so this proves the step is sync-free.
    net = _net().to("meta")
    opt = LARS(param_groups(net, 1e-6), lr=0.1)
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()


def test_warmup_cosine_shape() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = WarmupCosine(opt, base_lr=1.0, warmup_steps=4, total_steps=20, final_lr=0.01)
    assert [sched.lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sched.lr_at(4) == pytest.approx(1.0)  # cosine starts at the peak
    decay = [sched.lr_at(s) for s in range(4, 20)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert sched.lr_at(11.5) == pytest.approx(0.505)  # midpoint of the cosine
    assert sched.lr_at(19) == pytest.approx(0.01)
    assert sched.lr_at(500) == pytest.approx(0.01)  # clamped past the end

    no_warmup = WarmupCosine(opt, base_lr=2.0, warmup_steps=0, total_steps=3)
    assert [no_warmup.lr_at(s) for s in range(3)] == pytest.approx([2.0, 1.0, 0.0])


def test_warmup_cosine_apply_and_state() -> None:
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.1}], lr=0.0)
    sched = WarmupCosine(opt, base_lr=0.8, warmup_steps=2, total_steps=10)
    assert sched.apply(0) == pytest.approx(0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.04])

    state = sched.state_dict()
    assert state == {"base_lr": 0.8, "warmup_steps": 2, "total_steps": 10, "final_lr": 0.0}
    other = WarmupCosine(opt, base_lr=1.0, warmup_steps=0, total_steps=5)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.lr_at(7) == sched.lr_at(7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_lr=1.0, warmup_steps=0, total_steps=0),
        dict(base_lr=1.0, warmup_steps=-1, total_steps=10),
        dict(base_lr=1.0, warmup_steps=11, total_steps=10),
        dict(base_lr=0.0, warmup_steps=0, total_steps=10),
    ],
)
def test_warmup_cosine_validation(kwargs: dict) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        WarmupCosine(opt, **kwargs)


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name: str, cls: type) -> None:
    net = _net()
    opt = build_optimizer(net, name, 0.1, weight_decay=1e-4, momentum=0.8)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    if name != "adamw":
        assert opt.param_groups[0]["momentum"] == 0.8
    net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, net.parameters())]
    assert moved == [bool(p.grad.abs().max() > 1e-7) for p in net.parameters()]
    assert sum(moved) >= 6


def test_build_optimizer_unknown() -> None:
    with pytest.raises(ValueError, match="lamb"):
        build_optimizer(_net(), "lamb", 0.1, weight_decay=0.0)
