"""fused.convert: eager conv/norm/ReLU sequences become fused units in place, with the same
parameters, statistics, outputs and gradients; what cannot be fused is left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused
import models
from fused.convert import Converted


def hand_written():
    """Every pattern convert knows, and a few it must leave alone."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),            # 0 cbr
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(inplace=True),       # 4 crb
        nn.BatchNorm2d(8, affine=False, momentum=None),
        nn.BatchNorm2d(8, eps=1e-3), nn.Conv2d(8, 6, 1, stride=2), nn.ReLU(),   # 8 bcr
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),                  # 10 left
        nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4),                       # 13 c-b
        nn.Conv2d(4, 4, 1), nn.ReLU(),                                          # 15 no norm
        nn.BatchNorm2d(5),                                                      # 17 stray
        nn.Flatten(),
    )


def forward_backward(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def names_of(model):
    """Name before conversion of every parameter and buffer, by identity: convert keeps the
    tensors and moves them under new names."""
    return {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_same_training(converted, reference, x, rtol, atol, names):
    """Outputs, input and parameter gradients, and running statistics after one training
    step; then eval outputs. `names` maps the converted model's tensors to the reference's
    names (names_of before convert)."""
    (out, dx, _), (out_r, dx_r, _) = (forward_backward(m, x) for m in (converted, reference))
    torch.testing.assert_close(out, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, dx_r, rtol=rtol, atol=atol)
    params_r, buffers_r = dict(reference.named_parameters()), dict(reference.named_buffers())
    assert len(list(converted.parameters())) == len(params_r)
    for p in converted.parameters():
        torch.testing.assert_close(p.grad, params_r[names[id(p)]].grad, rtol=rtol, atol=atol,
                                   msg=names[id(p)])
    assert len(list(converted.buffers())) == len(buffers_r)
    for b in converted.buffers():
        torch.testing.assert_close(b, buffers_r[names[id(b)]], rtol=rtol, atol=atol,
                                   msg=names[id(b)])
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), reference.eval()(x), rtol=rtol,
                                   atol=atol)


def test_hand_written_sequential():
    model = hand_written()
    # a few batches of statistics, so running stats are not at their defaults (the stray
    # BatchNorm2d(5) at 17 does not fit the data path: run the layers before it)
    with torch.no_grad():
        for _ in range(3):
            model[:17](torch.randn(4, 3, 8, 8))
    reference = copy.deepcopy(model)
    params = {k: p for k, p in model.named_parameters()}
    names = names_of(model)
    keys_before = set(model.state_dict())

    done = fused.convert(model)

    assert done == [Converted("0", "conv-bn-relu", "bn"),
                    Converted("4", "conv-relu-bn", "bn-minus"),
                    Converted("8", "bn-conv-relu", "bn"),
                    Converted("13", "conv-bn-relu", "bn")]
    assert done.model is model
    assert [type(m).__name__ for m in model] == [
        "FusedUnit", "Identity", "Identity", "MaxPool2d", "FusedUnit", "Identity", "Identity",
        "Identity", "FusedUnit", "Identity", "Conv2d", "BatchNorm2d", "ReLU", "FusedUnit",
        "Identity", "Conv2d", "ReLU", "BatchNorm2d", "Flatten"]
    assert model[13].relu is False and model[0].relu is True
    assert model[4].norm.momentum is None and model[8].norm.eps == 1e-3
    # the same Parameter objects (an optimizer built before convert keeps working)
    for k, p in model.named_parameters():
        assert any(p is q for q in params.values()), k
    # untouched layers keep their keys; converted ones move under <conv index>.conv/.norm
    keys = set(model.state_dict())
    assert {k for k in keys_before if k.split(".")[0] in ("10", "11", "15", "17")} <= keys
    assert {"0.conv.weight", "0.norm.running_mean", "8.norm.weight", "8.conv.bias"} <= keys
    for k, v in model.state_dict().items():
        if k.startswith(("0.", "4.", "8.", "13.")):
            index, child, name = k.split(".")
            offset = {"0": (0, 1), "4": (0, 2), "8": (1, 0), "13": (0, 1)}[index]
            source = int(index) - (1 if index == "8" else 0) + offset[child == "norm"]
            assert torch.equal(v, reference.state_dict()[f"{source}.{name}"]), k
    assert_same_training(model[:17], reference[:17], torch.randn(4, 3, 8, 8),
                         rtol=1e-5, atol=1e-5, names=names)


def test_hand_written_float64_exact():
    model = hand_written()[:17].double()
    reference, names = copy.deepcopy(model), names_of(model)
    assert len(fused.convert(model)) == 4
    assert_same_training(model, reference, torch.randn(3, 3, 10, 10, dtype=torch.float64),
                         rtol=1e-10, atol=1e-12, names=names)


def test_inplace_false_and_nesting():
    class Custom(nn.Module):
        """Conv/BN/ReLU as attributes: the data flow is in forward, so they stay."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.body = nn.Sequential(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                                                    nn.ReLU()))

        def forward(self, x):
            return self.body(F.relu(self.bn(self.conv(x))))

    model = Custom()
    done = fused.convert(model, inplace=False)
    assert done == [Converted("body.0.1", "bn-conv-relu", "bn")]   # at the conv's place
    assert type(model.body[0][1]) is nn.Conv2d               # the original is untouched
    assert type(done.model.body[0][1]) is fused.FusedUnit
    assert type(done.model.conv) is nn.Conv2d
    moved = {"body.0.1.norm.": "body.0.0.", "body.0.1.conv.": "body.0.1."}
    names = {id(t): next((n.replace(a, b) for a, b in moved.items() if n.startswith(a)), n)
             for n, t in [*done.model.named_parameters(), *done.model.named_buffers()]}
    assert_same_training(done.model, model, torch.randn(2, 3, 9, 9), rtol=1e-5, atol=1e-5,
                         names=names)
    assert fused.convert(done.model) == []                   # nothing left to convert


def test_affine_norm_and_eval_mode_carry_over():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), fused.Affine2d(3)).eval()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 2)
    reference = copy.deepcopy(model)
    assert fused.convert(model) == [Converted("0", "conv-relu-bn", "affine")]
    assert not model[0].training
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "cnn"])
def test_built_eager_network(name):
    options = dict(input_size=16) if name == "cnn" else {}
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for order in fused.ORDERS:
        model = models.build(name, order, "bn", "eager", **options).double()
        reference, names = copy.deepcopy(model), names_of(model)
        keys = list(model.state_dict())
        done = fused.convert(model)
        units = models.units_of(model)
        assert [e.path for e in done] == [path for path, _ in units]
        assert all(type(u) is fused.FusedUnit and u.order == order for _, u in units)
        assert {(e.order, e.norm) for e in done} == {(order, "bn")}
        assert list(model.state_dict()) == keys
        # the converted network is the fused network: the same modules, parameter for parameter
        fresh = models.build(name, order, "bn", "fused", **options).double()
        assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
        assert_same_training(model, reference, x, rtol=1e-10, atol=1e-12, names=names)


def test_lone_unit_is_refused():
    with pytest.raises(TypeError, match="inside a model"):
        fused.convert(fused.make_unit("conv-bn-relu", 3, 4, 3))
