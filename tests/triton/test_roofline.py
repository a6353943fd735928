"""The paper roofline (fused/triton/roofline.py): shapes, byte counts and bounds."""
import pytest
import torch
import torch.nn.functional as F

from fused.triton import roofline as R


@pytest.mark.parametrize("name", sorted(R.LAYERS))
def test_layer_output_size_matches_conv2d(name):
    layer = R.LAYERS[name]
    y = F.conv2d(torch.empty(1, layer.c, layer.h, layer.w, device="meta"),
                 torch.empty(layer.o, layer.c, layer.r, layer.s, device="meta"),
                 stride=layer.stride, padding=layer.padding)
    assert tuple(y.shape[2:]) == (layer.p, layer.q)


def test_bn_passes_move_design_table_bytes():
    layer = R.LAYERS["resnet50.conv2_3x3"]
    a = layer.y_elems * 2  # float16 activation tensor
    vectors = 6 * layer.o * 4
    for kernel, tensors in (("stats_partial_kernel", 1), ("apply_kernel", 2),
                            ("backward_reduce_kernel", 2), ("backward_apply_kernel", 3)):
        assert R.kernel_cost(kernel, layer, torch.float16).bytes == tensors * a + vectors


def test_conv_flops_and_bound():
    layer = R.LAYERS["vgg16.conv3_2"]
    cost = R.kernel_cost("conv_fwd_kernel", layer, torch.bfloat16)
    assert cost.flops == 2 * 64 * 56 * 56 * 256 * 256 * 9
    h100 = R.GPUS["H100"]
    expected = max(cost.bytes / 3.35e12, cost.flops / 989.4e12)
    assert R.bound_seconds(cost, h100, torch.bfloat16) == pytest.approx(expected)
    assert R.bound_by(cost, h100, torch.bfloat16) == "compute"
    # float32 without TF32 runs at the vector rate: a longer bound than bf16
    assert (R.bound_seconds(R.kernel_cost("conv_fwd_kernel", layer, torch.float32), h100,
                            torch.float32) > R.bound_seconds(cost, h100, torch.bfloat16))


def test_share_and_gpu_lookup():
    cost = R.kernel_cost("apply_kernel", R.LAYERS["resnet20.stage1"], torch.float32)
    a100 = R.gpu_named("NVIDIA A100-SXM4-80GB")
    assert a100 is R.GPUS["A100"] and R.gpu_named("NVIDIA GeForce RTX 4090") is None
    bound = R.bound_seconds(cost, a100, torch.float32)
    assert R.share(2 * bound, cost, a100, torch.float32) == pytest.approx(0.5)
    assert R.share(1.0, cost, None, torch.float32) is None
    with pytest.raises(ValueError, match="positive"):
        R.share(0.0, cost, a100, torch.float32)
    with pytest.raises(KeyError, match="no roofline"):
        R.kernel_cost("unknown_kernel", R.LAYERS["resnet20.stage1"], torch.float32)


def test_every_launched_kernel_has_a_roofline():
    from fused.triton import aot
    layer = R.LAYERS["resnet20.stage1"]
    for kernel in aot.launched_kernels():
        assert R.kernel_cost(kernel, layer, torch.float32).bytes > 0, kernel
